"""Rows of examples, and batches of rows as tensors.

A *row* is one sequence of the batch: a tuple of examples placed one after
another (one example without packing, several with it).

Contract of :func:`collate`:

* ``input_ids``/``labels``/``position_ids``: ``[rows, T]``, ``T`` the longest
  row of the batch; rows are right-padded with ``pad_id`` and label -100.
* Each example's positions restart at 0 and its first label is -100 (no
  example is ever trained to predict its first token from the one before it),
  so a packed row trains exactly what its examples would alone.
* Unpacked (``packed=False``): ``attention_mask`` is 1 on tokens and 0 on padding.
* Packed: ``attention_mask`` is None. Then transformers (5.x, with
  ``use_cache=False``) derives a block-diagonal causal mask from the restarting
  ``position_ids`` (``masking_utils.find_packed_sequence_indices``), so
  attention never crosses examples. The padding tail gets positions restarting
  at 0 as well: it is a block of its own that no example sees.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraq.data.tokenize import IGNORE_INDEX, Example

Row = tuple[Example, ...]


@dataclass
class Batch:
    """One micro-batch, ready for a causal LM (``model(**batch.model_inputs())``).

    ``num_trained_tokens``: positions whose label is not -100 (what the loss
    averages over); ``global_trained_tokens``: the same over the whole global
    batch that this rank's batch is a slice of (divide a summed loss by it so
    that N ranks add up to exactly the single-process loss).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    num_examples: int
    num_tokens: int
    num_trained_tokens: int
    global_trained_tokens: int

    def model_inputs(self) -> dict:
        """Keyword arguments for a transformers causal LM forward (loss from ``labels``, no cache)."""
        inputs = {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                  "use_cache": False}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs

    def to(self, device: torch.device | str) -> Batch:
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.attention_mask),
                     self.num_examples, self.num_tokens, self.num_trained_tokens, self.global_trained_tokens)


def row_length(row: Row) -> int:
    return sum(len(example) for example in row)


def pack(examples: Sequence[Example], seq_len: int) -> list[Row]:
    """Group examples into rows of at most ``seq_len`` tokens (best-fit decreasing; deterministic).

    Longest first, each example goes to the open row with the least room that
    still fits it, else it opens a new row. Ties keep input order. Every
    example must already be at most ``seq_len`` long.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        size = len(examples[i])
        if size > seq_len:
            raise ValueError(f"example of {size} tokens is longer than seq_len {seq_len}; truncate first")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            room, r = free.pop(slot)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, r))
    return [tuple(examples[i] for i in sorted(members)) for members in rows]


def pack_lengths(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack` on example lengths alone, for millions of examples: ``(row_starts, members)``.

    Row ``r`` holds the examples ``members[row_starts[r]:row_starts[r + 1]]``
    (ascending), rows in the order :func:`pack` makes them: the same rows.
    Instead of one sorted list of ``(room left, row)`` (an insertion into it
    moves every entry after it), each value of room left has a heap of the
    rows with that room, and a sorted list holds the room values in use (at
    most ``seq_len`` of them): the smallest room that fits, then its lowest row.
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > seq_len:
        raise ValueError(f"example of {int(sizes.max())} tokens is longer than seq_len {seq_len}; truncate first")
    row_of = np.empty(len(sizes), dtype=np.int64)
    rooms: list[int] = []  # sorted room values that some open row has
    rows_with: dict[int, list[int]] = {}  # room -> heap of row indices
    n_rows = 0
    size_list = sizes.tolist()
    for i in np.argsort(-sizes, kind="stable").tolist():
        size = size_list[i]
        slot = bisect.bisect_left(rooms, size)
        if slot < len(rooms):
            room = rooms[slot]
            heap = rows_with[room]
            r = heapq.heappop(heap)
            if not heap:
                del rooms[slot], rows_with[room]
        else:
            room, r = seq_len, n_rows
            n_rows += 1
        row_of[i] = r
        left = room - size
        if left > 0:
            if left in rows_with:
                heapq.heappush(rows_with[left], r)
            else:
                rows_with[left] = [r]
                bisect.insort(rooms, left)
    members = np.lexsort((np.arange(len(sizes)), row_of))
    row_starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=n_rows))]).astype(np.int64)
    return row_starts, members.astype(np.int64)


def collate(rows: Sequence[Row], pad_id: int, packed: bool, global_trained_tokens: int | None = None) -> Batch:
    """Rows to padded tensors (see the module docstring for the exact layout)."""
    width = max(row_length(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example)
            input_ids[r, at:at + n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[r, at + 1:at + n] = torch.tensor(example.labels[1:], dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        attention_mask[r, :at] = 1
        position_ids[r, at:] = torch.arange(width - at)
    trained = int((labels != IGNORE_INDEX).sum())
    return Batch(input_ids=input_ids, labels=labels, position_ids=position_ids,
                 attention_mask=None if packed else attention_mask,
                 num_examples=sum(len(row) for row in rows), num_tokens=int(attention_mask.sum()),
                 num_trained_tokens=trained,
                 global_trained_tokens=trained if global_trained_tokens is None else global_trained_tokens)


def padding_fraction(batches: Sequence[Sequence[Row]]) -> float:
    """Share of the batch tensors' slots that are padding, when each batch is padded to its longest row."""
    slots = tokens = 0
    for rows in batches:
        lengths = [row_length(row) for row in rows]
        slots += max(lengths) * len(lengths)
        tokens += sum(lengths)
    return 1.0 - tokens / slots if slots else 0.0


def padding_fraction_of(row_lengths: np.ndarray, order: Sequence[int], batch_size: int) -> float:
    """:func:`padding_fraction` of the batches ``order[k:k + batch_size]``, from row lengths alone."""
    if len(order) == 0:
        return 0.0
    ordered = np.asarray(row_lengths, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    starts = np.arange(0, len(ordered), batch_size)
    counts = np.diff(np.append(starts, len(ordered)))
    slots = int((np.maximum.reduceat(ordered, starts) * counts).sum())
    tokens = int(ordered.sum())
    return 1.0 - tokens / slots if slots else 0.0
