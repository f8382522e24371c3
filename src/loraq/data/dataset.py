"""From the data flags of a TrainConfig to training rows, validation rows and references.

``build_data(cfg, tokenizer)`` reads ``cfg.data`` (the bundled demo set when
None), converts it to samples (format detected, or ``cfg.format``), holds out
a validation set (``cfg.val_data``, or ``cfg.val_fraction`` of the records,
chosen by ``cfg.seed``; for the demo set, its eval split), tokenizes with
masks, truncates to ``cfg.seq_len``, drops examples left without a trained
token (counted; all dropped is a DataError), packs when ``cfg.packing``, and
collects up to ``cfg.eval_samples`` evaluation references (from the
validation set when there is one, else from the training set), and, for
``--init calibrated``, the calibration rows (:func:`calibration_rows`).

The train loop then takes batches from ``bundle.train_batches(...)`` (a
:class:`~loraq.data.batches.BatchIterator`) and evaluates on
``bundle.val_batches(...)`` and ``bundle.references``.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraq.data.batches import BatchIterator, epoch_order, ordered_batches
from loraq.data.formats import Sample, to_sample, to_samples
from loraq.data.packing import Batch, Row, pack_lengths, padding_fraction_of
from loraq.data.prepare import prepare_store
from loraq.data.prompts import pad_token_id
from loraq.data.readers import read_records
from loraq.data.references import EvalReference, eval_references, has_reference, max_answer_tokens
from loraq.data.sources import open_source
from loraq.data.store import TokenStore
from loraq.data.tokenize import Example, tokenize_documents, tokenize_sample, truncate
from loraq.data.views import StoreExamples, StoreRows, document_chunks, sample_examples
from loraq.errors import DataError


@dataclass
class SplitStats:
    """Counts for one split. ``examples``: after dropping; ``rows``: sequences after packing."""

    records: int = 0
    examples: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0
    padding_fraction: float = 0.0  # one example per row, padded to the longest in each batch
    padding_fraction_packed: float = 0.0  # packed rows, padded to the longest in each batch
    packed_rows: int = 0  # rows that --packing makes


@dataclass
class DataStats:
    format: str
    path: str
    val_path: str | None
    seq_len: int
    packing: bool
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    train: SplitStats = field(default_factory=SplitStats)
    val: SplitStats | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HeldInMemory:
    """The fields the loop reads, for data held as Python objects rather than token stores (preference pairs,
    GRPO's prompts); the names are :class:`DataBundle`'s (``references`` empty: no exact match on them)."""

    format: str
    train: list
    val: list
    stats: DataStats
    pad_id: int
    seq_len: int
    references: list = field(default_factory=list)
    max_answer_tokens: int = 0
    packed: bool = False
    references_held_out: bool = True


@dataclass
class DataBundle:
    """Everything the loop needs from the data (see the module docstring)."""

    format: str
    train: Sequence[Row]
    val: Sequence[Row]
    train_examples: Sequence[Example]
    references: list[EvalReference]
    stats: DataStats
    pad_id: int
    packed: bool
    seq_len: int
    max_answer_tokens: int
    store_paths: list[str] = field(default_factory=list)  # the token stores read (train, then validation)
    calibration: list[list[int]] | None = None  # token rows for --init calibrated (calibration_rows)
    references_held_out: bool = True  # False: no validation data, so exact match is scored on training examples

    def train_batches(self, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> BatchIterator:
        """Endless shuffled batches; rank ``rank`` gets its slice of each global batch."""
        return BatchIterator(self.train, global_batch_size=global_batch_size, pad_id=self.pad_id, packed=self.packed,
                             seed=seed, rank=rank, world_size=world_size)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The validation rows in order (one pass)."""
        return ordered_batches(self.val, batch_size, self.pad_id, self.packed)


def read_samples(path: str | Path, fmt: str = "auto", skipped: list[str] | None = None) -> tuple[str, list[Sample]]:
    """Read a file and convert its records: (format, samples)."""
    return to_samples(read_records(path, skipped), fmt, skipped)


def tokenize_samples(samples: Sequence[Sample], tokenizer: Any, seq_len: int, train_on_inputs: bool = False,
                     source: str = "data") -> tuple[list[Example], SplitStats]:
    """Tokenize, truncate and drop examples without trained tokens; DataError when none is left."""
    stats = SplitStats(records=len(samples))
    if samples and samples[0].kind == "text":
        examples = tokenize_documents(samples, tokenizer, seq_len)
    else:
        examples = []
        for sample in samples:
            example, cut = truncate(tokenize_sample(sample, tokenizer, train_on_inputs), seq_len)
            stats.truncated += cut
            stats.longest = max(stats.longest, len(example))
            if example.num_trained == 0:
                stats.dropped += 1
                continue
            examples.append(example)
    if samples and not examples:
        raise DataError(f"{source}: all {len(samples)} examples lose every trained token when cut to --seq-len "
                        f"{seq_len}; raise --seq-len")
    stats.examples = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.trained_tokens = sum(e.num_trained for e in examples)
    stats.longest = max([stats.longest] + [len(e) for e in examples])
    return examples, stats


def split_off(samples: list[Sample], fraction: float, seed: int, source: str) -> tuple[list[Sample], list[Sample]]:
    """(train, val): ``round(fraction * n)`` samples (at least 1) chosen by ``seed``, both kept in file order."""
    n_val = max(1, round(fraction * len(samples)))
    if n_val >= len(samples):
        raise DataError(f"{source}: {len(samples)} examples are too few to hold out --val-fraction {fraction}; "
                        f"add data or use --val-data")
    order = list(range(len(samples)))
    random.Random(f"loraq-val:{seed}").shuffle(order)
    held = set(order[:n_val])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def split_indices(n: int, fraction: float, seed: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_off` on sample indices: (train, val), both ascending."""
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"{source}: {n} examples are too few to hold out --val-fraction {fraction}; "
                        f"add data or use --val-data")
    order = list(range(n))
    random.Random(f"loraq-val:{seed}").shuffle(order)
    held = np.zeros(n, dtype=bool)
    held[np.asarray(order[:n_val], dtype=np.int64)] = True
    del order
    return np.flatnonzero(~held), np.flatnonzero(held)


@dataclass
class _Split:
    rows: StoreRows
    examples: StoreExamples
    stats: SplitStats
    samples: np.ndarray  # the store samples of the split (references are taken from them)


def _split(store: TokenStore, source: Any, samples: np.ndarray, cfg: Any, source_name: str) -> _Split:
    """The split's examples (dropped ones left out), its rows (packed or not) and its stats."""
    stats = SplitStats(records=len(samples))
    if store.meta["kind"] == "text":
        examples = document_chunks(store, samples, cfg.seq_len, source.name)
    else:
        examples = sample_examples(store, samples[np.asarray(store.trained[samples]) > 0], source.where)
        stats.truncated = int(np.asarray(store.truncated[samples]).sum())
        stats.dropped = len(samples) - len(examples)
        stats.longest = int(store.lengths[samples].max()) if len(samples) else 0
    if len(samples) and not len(examples):
        raise DataError(f"{source_name}: all {len(samples)} examples lose every trained token when cut to --seq-len "
                        f"{cfg.seq_len}; raise --seq-len")
    stats.examples = len(examples)
    stats.tokens = int(examples.lengths.sum())
    stats.trained_tokens = int(examples.num_trained.sum())
    stats.longest = max([stats.longest, int(examples.lengths.max()) if len(examples) else 0])
    packed = StoreRows(examples, *pack_lengths(examples.lengths, cfg.seq_len))
    single = StoreRows(examples)
    stats.packed_rows = len(packed)
    if len(examples):
        stats.padding_fraction = padding_fraction_of(single.row_lengths(), epoch_order(len(single), cfg.seed, 0),
                                                     cfg.batch_size)
        stats.padding_fraction_packed = padding_fraction_of(packed.row_lengths(),
                                                            epoch_order(len(packed), cfg.seed, 0), cfg.batch_size)
    rows = packed if cfg.packing else single
    stats.rows = len(rows)
    return _Split(rows, examples, stats, samples)


def build_data(cfg: Any, tokenizer: Any, skip_bad: bool | None = None, *, workers: int | None = None,
               log: Callable[[str], None] | None = None) -> DataBundle:
    """Train and validation rows, references and stats from ``cfg``'s data flags (see the module docstring).

    ``skip_bad`` (default: ``cfg.skip_bad_examples`` if the config has it)
    leaves bad records out and counts them instead of raising. ``workers``:
    processes that tokenize (default: one per core for large data; see
    :func:`~loraq.data.prepare.resolve_workers`); ``log`` gets progress lines.
    """
    from loraq.data.demo import demo_paths

    if skip_bad is None:
        skip_bad = bool(getattr(cfg, "skip_bad_examples", False))
    path, val_path = cfg.data, cfg.val_data
    if path is None:
        path, demo_eval = demo_paths()
        if val_path is None and not cfg.val_fraction:
            val_path = demo_eval
    prepare = functools.partial(prepare_store, tokenizer=tokenizer, fmt=cfg.format, seq_len=cfg.seq_len,
                                train_on_inputs=cfg.train_on_inputs, skip_bad=skip_bad, workers=workers, log=log)
    source = open_source(path, split=getattr(cfg, "data_split", None), config=getattr(cfg, "data_config", None))
    store = prepare(source)
    fmt = store.meta["format"]
    samples = np.arange(store.samples)
    val_source = val_store = None
    val_samples = np.zeros(0, dtype=np.int64)
    if val_path is not None:
        val_source = open_source(val_path, role="validation")
        val_store = prepare(val_source)
        val_samples = np.arange(val_store.samples)
        if (val_store.meta["kind"] == "text") != (fmt == "text"):
            raise DataError(f"{val_path}: validation data must be of the same kind as {path} ({fmt}); "
                            f"convert it or pass --format")
    elif cfg.val_fraction:
        samples, val_samples = split_indices(store.samples, cfg.val_fraction, cfg.seed, str(path))
        val_source, val_store = source, store

    train = _split(store, source, samples, cfg, str(path))
    val = _split(val_store, val_source, val_samples, cfg, str(val_path or path)) if val_store is not None else None
    ref_source, ref_store, ref_samples = (val_source, val_store, val_samples) if val is not None \
        else (source, store, samples)
    references = eval_references(reference_samples(ref_source, ref_store, ref_samples, fmt, cfg.eval_samples),
                                 tokenizer, cfg.eval_samples)
    skipped = store.meta["skipped"] + (val_store.meta["skipped"] if val_store is not None and val_path else 0)
    messages = list(store.meta["skipped_messages"]) + (list(val_store.meta["skipped_messages"]) if val_path else [])
    stats = DataStats(format=fmt, path=str(path), val_path=None if val_path is None else str(val_path),
                      seq_len=cfg.seq_len, packing=cfg.packing, skipped=skipped, skipped_messages=messages[:20],
                      train=train.stats, val=val.stats if val is not None else None)
    calibration = calibration_rows(cfg, train.examples, tokenizer) if getattr(cfg, "init", None) == "calibrated" \
        else None
    return DataBundle(format=fmt, train=train.rows, val=val.rows if val is not None else [],
                      train_examples=train.examples, references=references, stats=stats, pad_id=pad_token_id(tokenizer),
                      packed=bool(cfg.packing), seq_len=cfg.seq_len,
                      max_answer_tokens=max_answer_tokens(references, tokenizer), references_held_out=val is not None,
                      store_paths=[str(store.folder)] + ([str(val_store.folder)] if val_path else []),
                      calibration=calibration)


def calibration_rows(cfg: Any, train_examples: Sequence[Example], tokenizer: Any) -> list[list[int]]:
    """Token rows for ``--init calibrated``: up to ``cfg.calibration_samples``, chosen by ``cfg.seed``.

    From ``cfg.calibration_data`` when given (tokenized as training data is,
    prompt included: every token the model reads counts), else the training
    examples themselves, so the adapter starts fitted to what it will see.
    """
    examples = train_examples
    if cfg.calibration_data:
        _, samples = read_samples(cfg.calibration_data, "auto")
        examples, _ = tokenize_samples(samples, tokenizer, cfg.seq_len, train_on_inputs=True,
                                       source=str(cfg.calibration_data))
    order = list(range(len(examples)))
    random.Random(f"loraq-calibration:{cfg.seed}").shuffle(order)
    return [list(examples[i].input_ids) for i in sorted(order[:cfg.calibration_samples])]


def reference_samples(source: Any, store: TokenStore, samples: np.ndarray, fmt: str, limit: int) -> list[Sample]:
    """The first samples of ``samples`` (store indices) that have a reference answer, at most ``limit``, read
    again from the source (the store keeps tokens, not messages); the read stops as soon as they are found."""
    if limit <= 0 or not len(samples) or store.meta["kind"] == "text":
        return []
    wanted = np.asarray(store.ordinals[samples])
    found: list[Sample] = []
    k = 0
    for ordinal, (number, payload) in enumerate(source.items()):
        if ordinal < wanted[k]:
            continue
        sample = to_sample(source.record(number, payload), fmt)
        if has_reference(sample):
            found.append(sample)
        k += 1
        if len(found) >= limit or k == len(wanted):
            break
    return found
