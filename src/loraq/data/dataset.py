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

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from loraq.data.batches import BatchIterator, epoch_order, ordered_batches
from loraq.data.formats import Sample, to_samples
from loraq.data.packing import Batch, Row, pack, padding_fraction
from loraq.data.prompts import pad_token_id
from loraq.data.readers import read_records
from loraq.data.references import EvalReference, eval_references, max_answer_tokens
from loraq.data.tokenize import Example, tokenize_documents, tokenize_sample, truncate
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
class DataBundle:
    """Everything the loop needs from the data (see the module docstring)."""

    format: str
    train: list[Row]
    val: list[Row]
    train_examples: list[Example]
    references: list[EvalReference]
    stats: DataStats
    pad_id: int
    packed: bool
    seq_len: int
    max_answer_tokens: int
    calibration: list[list[int]] | None = None  # token rows for --init calibrated (calibration_rows)

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


def _pad_fractions(examples: Sequence[Example], seq_len: int, batch_size: int, seed: int) -> tuple[float, float]:
    """Padding share of epoch 0's batches, without and with packing."""
    def share(rows: list[Row]) -> float:
        order = epoch_order(len(rows), seed, 0)
        return padding_fraction([[rows[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)])

    if not examples:
        return 0.0, 0.0
    return share([(e,) for e in examples]), share(pack(examples, seq_len))


def build_data(cfg: Any, tokenizer: Any, skip_bad: bool | None = None) -> DataBundle:
    """Train and validation rows, references and stats from ``cfg``'s data flags (see the module docstring).

    ``skip_bad`` (default: ``cfg.skip_bad_examples`` if the config has it)
    leaves bad records out and counts them instead of raising.
    """
    from loraq.data.demo import demo_paths

    if skip_bad is None:
        skip_bad = bool(getattr(cfg, "skip_bad_examples", False))
    skipped: list[str] | None = [] if skip_bad else None
    path, val_path = cfg.data, cfg.val_data
    if path is None:
        path, demo_eval = demo_paths()
        if val_path is None and not cfg.val_fraction:
            val_path = demo_eval
    fmt, samples = read_samples(path, cfg.format, skipped)
    val_samples: list[Sample] = []
    if val_path is not None:
        _, val_samples = read_samples(val_path, cfg.format, skipped)
        if (val_samples[0].kind == "text") != (fmt == "text"):
            raise DataError(f"{val_path}: validation data must be of the same kind as {path} ({fmt}); "
                            f"convert it or pass --format")
    elif cfg.val_fraction:
        samples, val_samples = split_off(samples, cfg.val_fraction, cfg.seed, str(path))

    train_examples, train_stats = tokenize_samples(samples, tokenizer, cfg.seq_len, cfg.train_on_inputs, str(path))
    val_examples, val_stats = tokenize_samples(val_samples, tokenizer, cfg.seq_len, cfg.train_on_inputs,
                                               str(val_path or path))
    train_rows = _rows(train_examples, cfg.seq_len, cfg.packing)
    val_rows = _rows(val_examples, cfg.seq_len, cfg.packing)
    for split, examples, rows in ((train_stats, train_examples, train_rows), (val_stats, val_examples, val_rows)):
        split.rows = len(rows)
        split.padding_fraction, split.padding_fraction_packed = _pad_fractions(examples, cfg.seq_len, cfg.batch_size,
                                                                               cfg.seed)
    references = eval_references(val_samples or samples, tokenizer, cfg.eval_samples)
    stats = DataStats(format=fmt, path=str(path), val_path=None if val_path is None else str(val_path),
                      seq_len=cfg.seq_len, packing=cfg.packing, skipped=len(skipped or []),
                      skipped_messages=list(skipped or [])[:20], train=train_stats,
                      val=val_stats if val_samples else None)
    calibration = calibration_rows(cfg, train_examples, tokenizer) if getattr(cfg, "init", None) == "calibrated" else None
    return DataBundle(format=fmt, train=train_rows, val=val_rows, train_examples=train_examples, references=references,
                      stats=stats, pad_id=pad_token_id(tokenizer), packed=bool(cfg.packing), seq_len=cfg.seq_len,
                      max_answer_tokens=max_answer_tokens(references, tokenizer), calibration=calibration)


def calibration_rows(cfg: Any, train_examples: Sequence[Example], tokenizer: Any) -> list[list[int]]:
    """Token rows for ``--init calibrated``: up to ``cfg.calibration_samples``, chosen by ``cfg.seed``.

    From ``cfg.calibration_data`` when given (tokenized as training data is,
    prompt included: every token the model reads counts), else the training
    examples themselves, so the adapter starts fitted to what it will see.
    """
    examples = list(train_examples)
    if cfg.calibration_data:
        _, samples = read_samples(cfg.calibration_data, "auto")
        examples, _ = tokenize_samples(samples, tokenizer, cfg.seq_len, train_on_inputs=True,
                                       source=str(cfg.calibration_data))
    order = list(range(len(examples)))
    random.Random(f"loraq-calibration:{cfg.seed}").shuffle(order)
    return [list(examples[i].input_ids) for i in sorted(order[:cfg.calibration_samples])]


def _rows(examples: list[Example], seq_len: int, packing: bool) -> list[Row]:
    return pack(examples, seq_len) if packing else [(e,) for e in examples]
