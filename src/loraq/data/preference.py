"""Preference pairs: a prompt, a chosen and a rejected answer, as token rows for DPO and ORPO.

Records (format ``preference``, in every file type loraq reads):

* plain: ``{"prompt": str, "chosen": str, "rejected": str}`` (TRL's standard
  format). No chat template: each answer is ``prompt + answer`` as text (the
  tokenizer's own BOS) followed by EOS, like the ``completion`` format.
* conversational: ``"prompt"`` a list of ``{"role", "content"}`` messages (a
  shared history: system, user, earlier assistant turns) and ``"chosen"`` /
  ``"rejected"`` the answer turns (a list of messages, or a string: one
  assistant message); or, without ``"prompt"``, ``"chosen"`` and
  ``"rejected"`` whole conversations whose shared leading messages are the
  prompt (TRL's implicit prompt). Rendered with the chat template, as chat
  samples are.

Each pair becomes two :class:`~loraq.data.tokenize.Example` rows (chosen,
rejected) whose labels mark the answer only: in a chat, the answer turns'
content and their end-of-turn marker (the SFT rule of :mod:`loraq.data.tokenize`);
in plain text, the answer and EOS. The prompt is never trained or scored here.

Truncation to ``seq_len`` keeps the prompt whole and cuts the answers to the
room left (TRL's ``keep_start``); a prompt that leaves no room for one answer
token is an error naming the record. A missing or ill-typed field, empty
content, or a pair whose chosen equals its rejected is an error naming
``file:line`` (skipped and counted with ``--skip-bad-examples``).

A batch of ``B`` pairs is ``2B`` rows: the chosen answers first, then the
rejected ones in the same order (:func:`collate_pairs`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraq.data.batches import BatchIterator
from loraq.data.dataset import DataStats, HeldInMemory, SplitStats, split_off
from loraq.data.formats import Sample, _chat_message, _keys, _text_field, guess_format
from loraq.data.packing import Batch, collate
from loraq.data.prompts import pad_token_id, prompt_ids
from loraq.data.readers import Record
from loraq.data.references import eval_references, max_answer_tokens
from loraq.data.sources import source_records
from loraq.data.tokenize import IGNORE_INDEX, Example, common_prefix, tokenize_sample, truncate
from loraq.errors import DataError

FORMAT = "preference"
_FIELDS = "prompt (a string or messages), chosen and rejected"


@dataclass(frozen=True)
class PreferenceSample:
    """One pair in loraq's internal form: ``kind`` "chat" (message lists) or "text" (strings)."""

    kind: str
    where: str
    prompt: str = ""
    prompt_messages: list[dict[str, str]] = field(default_factory=list)
    chosen: str | list[dict[str, str]] = ""
    rejected: str | list[dict[str, str]] = ""


@dataclass
class PairExample:
    """A tokenized pair: two rows sharing the prompt, labels on the answer tokens only."""

    chosen: Example
    rejected: Example
    where: str = ""

    @property
    def prompt_tokens(self) -> int:
        return _first_label(self.chosen)

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


# -- records -> samples ---------------------------------------------------------------------------------------
def to_preference_samples(records: Sequence[Record], skipped: list[str] | None = None) -> list[PreferenceSample]:
    """Every record as a pair (see the module docstring); with ``skipped``, bad records are left out and counted."""
    samples = []
    for record in records:
        try:
            samples.append(to_preference_sample(record))
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
    if not samples:
        raise DataError(f"{records[0].where}: no record is a usable preference pair (first problem: {skipped[0]}); "
                        "fix the data")
    return samples


def to_preference_sample(record: Record) -> PreferenceSample:
    data, where = record.data, record.where
    if guess_format(data) != FORMAT:
        raise DataError(f"{where}: not a preference pair (fields {_keys(data)}); --objective dpo and orpo train on "
                        f"records with {_FIELDS}")
    for key in ("chosen", "rejected"):
        if key not in data or data[key] is None:
            raise DataError(f"{where}: missing field '{key}' for a preference pair; records need {_FIELDS}")
    prompt, chosen, rejected = (_messages_or_text(data.get(k), k, where) for k in ("prompt", "chosen", "rejected"))
    chat = any(isinstance(v, list) for v in (prompt, chosen, rejected))
    if not chat:
        sample = PreferenceSample("text", where, prompt=_text_field(data, "prompt", where, FORMAT, allow_empty=True),
                                  chosen=_text_field(data, "chosen", where, FORMAT),
                                  rejected=_text_field(data, "rejected", where, FORMAT))
    else:
        history, chosen, rejected = _split_prompt(prompt, chosen, rejected, where)
        sample = PreferenceSample("chat", where, prompt_messages=history, chosen=chosen, rejected=rejected)
    if sample.chosen == sample.rejected:
        raise DataError(f"{where}: chosen and rejected are the same answer, so the pair teaches nothing; "
                        "fix or remove the record")
    return sample


def _messages_or_text(value: Any, key: str, where: str) -> str | list[dict[str, str]] | None:
    """A string, or a list of chat messages (a CSV cell may hold the list as JSON)."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{key}' must be a string or a list of messages, got {type(value).__name__}")
    return [_chat_message(m, i, f"{where} ({key})") for i, m in enumerate(value, start=1)]


def _as_turns(answer: str | list[dict[str, str]] | None, key: str, where: str) -> list[dict[str, str]]:
    if answer is None or answer == [] or (isinstance(answer, str) and not answer.strip()):
        raise DataError(f"{where}: field '{key}' is empty; fill it in or remove the record")
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer


def _split_prompt(prompt, chosen, rejected, where: str) -> tuple[list, list, list]:
    """(shared history, chosen turns, rejected turns); without a prompt, the shared leading messages are it."""
    chosen, rejected = _as_turns(chosen, "chosen", where), _as_turns(rejected, "rejected", where)
    if prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        history, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not history:
        raise DataError(f"{where}: the pair has no prompt; give 'prompt' or start chosen and rejected with the "
                        "same messages")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: '{key}' must end with an assistant turn (the answer)")
    return history, chosen, rejected


# -- samples -> token rows -----------------------------------------------------------------------------------------
def tokenize_pair(sample: PreferenceSample, tokenizer: Any, seq_len: int) -> tuple[PairExample, bool]:
    """(the pair as two rows with answer-only labels, cut to ``seq_len``; whether an answer was cut)."""
    rows = [_answer_row(sample, answer, tokenizer) for answer in (sample.chosen, sample.rejected)]
    prompt_len = max(_first_label(row) for row in rows)
    if prompt_len >= seq_len:
        raise DataError(f"{sample.where}: the prompt is {prompt_len} tokens and leaves no room for an answer in "
                        f"--seq-len {seq_len}; raise --seq-len or shorten the prompt")
    cut = [truncate(row, seq_len) for row in rows]
    return PairExample(cut[0][0], cut[1][0], sample.where), cut[0][1] or cut[1][1]


def _answer_row(sample: PreferenceSample, answer, tokenizer: Any) -> Example:
    if sample.kind == "text":
        return tokenize_sample(Sample("completion", sample.where, prompt=sample.prompt, completion=answer), tokenizer)
    full = tokenize_sample(Sample("chat", sample.where, messages=sample.prompt_messages + answer), tokenizer)
    # earlier assistant turns of the history are context here, not the answer
    start = common_prefix(full.input_ids, prompt_ids(tokenizer, messages=sample.prompt_messages))
    labels = [IGNORE_INDEX] * start + full.labels[start:]
    return Example(full.input_ids, labels, sample.where)


def _first_label(example: Example) -> int:
    return next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example))


# -- batches -------------------------------------------------------------------------------------------------------
@dataclass
class PairBatch(Batch):
    """``2B`` rows (B chosen, then the B rejected) and, per pair, its index in its split (for the reference cache).

    ``global_pairs``: pairs in the whole global batch (the DPO/ORPO loss is a mean over them);
    ``global_trained_tokens`` (from :class:`Batch`) counts the chosen answers' tokens of the global batch.
    """

    pair_index: torch.Tensor | None = None
    global_pairs: int = 0

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        moved = super().to(device)
        return PairBatch(**{**moved.__dict__, "pair_index": self.pair_index, "global_pairs": self.global_pairs})


def collate_pairs(pairs: Sequence[PairExample], indices: Sequence[int], pad_id: int,
                  global_pairs: int | None = None, global_chosen_tokens: int | None = None) -> PairBatch:
    """Pairs to one padded batch: chosen rows, then rejected rows (right padding, as :func:`collate`)."""
    rows = [(p.chosen,) for p in pairs] + [(p.rejected,) for p in pairs]
    batch = collate(rows, pad_id, packed=False)
    chosen_tokens = int((batch.labels[:len(pairs)] != IGNORE_INDEX).sum())
    batch.global_trained_tokens = chosen_tokens if global_chosen_tokens is None else global_chosen_tokens
    return PairBatch(**batch.__dict__, pair_index=torch.tensor(list(indices), dtype=torch.long),
                     global_pairs=len(pairs) if global_pairs is None else global_pairs)


class PairBatchIterator(BatchIterator):
    """:class:`~loraq.data.batches.BatchIterator`'s order, position and resume, over pairs."""

    def __next__(self) -> PairBatch:
        indices, mine = self.take()
        chosen_tokens = sum(self.rows[i].chosen.num_trained for i in indices)
        return collate_pairs([self.rows[i] for i in mine], mine, self.pad_id, global_pairs=len(indices),
                             global_chosen_tokens=chosen_tokens)


def ordered_pair_batches(pairs: Sequence[PairExample], batch_size: int, pad_id: int) -> Iterator[PairBatch]:
    """The pairs in file order, ``batch_size`` at a time (for the reference pass and evaluation)."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        yield collate_pairs(chunk, range(start, start + len(chunk)), pad_id)


# -- a split and the bundle ---------------------------------------------------------------------------------------
@dataclass
class PreferenceData(HeldInMemory):
    """What a DPO/ORPO run needs from its data: ``train``/``val`` are :class:`PairExample` lists (the references
    for exact match: prompt -> chosen answer)."""

    @property
    def train_examples(self) -> list[Example]:
        return [row for pair in self.train for row in (pair.chosen, pair.rejected)]

    def train_batches(self, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> PairBatchIterator:
        return PairBatchIterator(self.train, global_batch_size=global_batch_size, pad_id=self.pad_id, packed=False,
                                 seed=seed, rank=rank, world_size=world_size)

    def val_batches(self, batch_size: int) -> Iterator[PairBatch]:
        return ordered_pair_batches(self.val, batch_size, self.pad_id)


def tokenize_pairs(samples: Sequence[PreferenceSample], tokenizer: Any, seq_len: int,
                   skipped: list[str] | None = None) -> tuple[list[PairExample], SplitStats]:
    """Every sample as a tokenized pair, with the split's counts (tokens: both rows; trained: both answers)."""
    stats = SplitStats(records=len(samples))
    pairs = []
    for sample in samples:
        try:
            pair, cut = tokenize_pair(sample, tokenizer, seq_len)
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
            continue
        stats.truncated += cut
        pairs.append(pair)
    stats.examples = stats.rows = len(pairs)
    stats.tokens = sum(len(p) for p in pairs)
    stats.trained_tokens = sum(p.chosen.num_trained + p.rejected.num_trained for p in pairs)
    stats.longest = max([0] + [max(len(p.chosen), len(p.rejected)) for p in pairs])
    return pairs, stats


def read_pairs(path: str | Path, fmt: str, skipped: list[str] | None) -> list[PreferenceSample]:
    """A file's records as pairs; DataError when it holds no pairs or ``--format`` names another format."""
    if fmt not in ("auto", FORMAT):
        raise DataError(f"--format {fmt}: --objective dpo and orpo train on preference pairs ({_FIELDS}); "
                        "pass --format preference or leave it out")
    records = source_records(path, skipped)
    if guess_format(records[0].data) != FORMAT and skipped is None:
        raise DataError(f"{records[0].where}: the data has no preference pairs (fields {_keys(records[0].data)}); "
                        f"--objective dpo and orpo need records with {_FIELDS}")
    return to_preference_samples(records, skipped)


def build_preference_data(cfg: Any, tokenizer: Any, skip_bad: bool | None = None) -> PreferenceData:
    """Train and validation pairs from ``cfg``'s data flags (no ``--data``: the bundled preference demo and its
    eval split), and up to ``--eval-samples`` references (prompt -> chosen answer) for exact match."""
    from loraq.data.preference_demo import demo_paths

    skipped: list[str] | None = [] if (getattr(cfg, "skip_bad_examples", False) if skip_bad is None else skip_bad) \
        else None
    path, val_path = cfg.data, cfg.val_data
    if path is None:
        path, demo_eval = demo_paths()
        val_path = demo_eval if val_path is None and not cfg.val_fraction else val_path
    samples = read_pairs(path, cfg.format, skipped)
    val_samples: list[PreferenceSample] = []
    if val_path is not None:
        val_samples = read_pairs(val_path, cfg.format, skipped)
    elif cfg.val_fraction:
        samples, val_samples = split_off(samples, cfg.val_fraction, cfg.seed, str(path))
    train, train_stats = tokenize_pairs(samples, tokenizer, cfg.seq_len, skipped)
    val, val_stats = tokenize_pairs(val_samples, tokenizer, cfg.seq_len, skipped)
    if not train:
        raise DataError(f"{path}: no pair is left to train on (first problem: {(skipped or ['?'])[0]}); fix the data")
    stats = DataStats(format=FORMAT, path=str(path), val_path=None if val_path is None else str(val_path),
                      seq_len=cfg.seq_len, packing=False, skipped=len(skipped or []),
                      skipped_messages=list(skipped or [])[:20], train=train_stats,
                      val=val_stats if val_samples else None)
    references = eval_references([as_sft_sample(s) for s in (val_samples or samples)], tokenizer,
                                 getattr(cfg, "eval_samples", 0))
    return PreferenceData(format=FORMAT, train=train, val=val, stats=stats, pad_id=pad_token_id(tokenizer),
                          seq_len=cfg.seq_len, references=references,
                          max_answer_tokens=max_answer_tokens(references, tokenizer),
                          references_held_out=bool(val_samples))


def as_sft_sample(sample: PreferenceSample) -> Sample:
    """The pair's prompt and chosen answer as a supervised sample (what exact match compares generations with)."""
    if sample.kind == "text":
        return Sample("completion", sample.where, prompt=sample.prompt, completion=sample.chosen)
    return Sample("chat", sample.where, messages=sample.prompt_messages + sample.chosen)
