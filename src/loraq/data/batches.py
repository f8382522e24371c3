"""Batch order: deterministic shuffling, exact resume, and sharding across ranks.

Contract:

* Epoch ``e``'s order is a permutation of the rows that depends only on
  ``(seed, e)`` (Python's ``random.Random`` seeded with a string, so it is the
  same on every machine and Python version).
* That order is cut into *global* batches of ``global_batch_size`` rows;
  the last one is filled up by wrapping around to the start of the same
  order, so every global batch is full and an epoch has
  ``ceil(rows / global_batch_size)`` of them.
* Rank ``r`` of ``world_size`` gets the contiguous slice
  ``[r * b, (r + 1) * b)`` of each global batch (``b = global_batch_size /
  world_size``). So the union over ranks of step ``k`` is the same set of rows
  whatever ``world_size`` is: one process with a global batch of 8 sees what
  two processes with 4 each see together.
* The position is ``(epoch, index)``: the next global batch to hand out.
  ``state_dict()`` / ``load_state_dict()`` save and restore it (checked
  against the seed, row count and batch size), so a resumed run continues with
  exactly the batch an uninterrupted one would have taken.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from loraq.data.packing import Batch, Row, collate
from loraq.errors import DataError

STATE_VERSION = 1


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of one epoch, a function of (seed, epoch) alone."""
    order = list(range(num_rows))
    random.Random(f"loraq-data:{seed}:{epoch}").shuffle(order)
    return order


class BatchIterator:
    """Endless iterator over this rank's share of shuffled global batches (see the module docstring)."""

    def __init__(self, rows: Sequence[Row], *, global_batch_size: int, pad_id: int, packed: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not rows:
            raise ValueError("BatchIterator needs at least one row")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} must be a positive "
                             f"multiple of world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.micro_batch_size = global_batch_size // world_size
        self.pad_id, self.packed, self.seed = pad_id, packed, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = math.ceil(len(rows) / global_batch_size)
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, []

    def global_batch_indices(self, epoch: int, index: int) -> list[int]:
        """Row indices of global batch ``index`` of ``epoch`` (wrapping around within the epoch's order)."""
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, epoch_order(len(self.rows), self.seed, epoch)
        start = index * self.global_batch_size
        return [self._order[(start + k) % len(self._order)] for k in range(self.global_batch_size)]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        indices, mine = self.take()
        global_trained = sum(example.num_trained for i in indices for example in self.rows[i])
        return collate([self.rows[i] for i in mine], self.pad_id, self.packed, global_trained_tokens=global_trained)

    def take(self) -> tuple[list[int], list[int]]:
        """The next global batch's row indices and this rank's slice of them; the position moves on."""
        indices = self.global_batch_indices(self.epoch, self.index)
        mine = indices[self.rank * self.micro_batch_size:(self.rank + 1) * self.micro_batch_size]
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return indices, mine

    def state_dict(self) -> dict:
        """The position (next global batch) and what it is only valid for."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "index": self.index, "seed": self.seed,
                "rows": len(self.rows), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; DataError when it was saved for other data or settings."""
        expected = {"version": STATE_VERSION, "seed": self.seed, "rows": len(self.rows),
                    "global_batch_size": self.global_batch_size}
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k} {saved} then, {now} now" for k, (saved, now) in wrong.items())
            raise DataError(f"the checkpoint's data position belongs to other data or settings ({detail}); "
                            f"resume with the same --data, --seed, --seq-len, --packing and batch size")
        if not (0 <= state["index"] < self.batches_per_epoch and state["epoch"] >= 0):
            raise DataError(f"the checkpoint's data position (epoch {state['epoch']}, batch {state['index']}) is out "
                            f"of range for this data; resume with the same data and settings")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def ordered_batches(rows: Sequence[Row], batch_size: int, pad_id: int, packed: bool) -> Iterator[Batch]:
    """Rows in file order, ``batch_size`` at a time, the last batch possibly smaller (for evaluation)."""
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start:start + batch_size], pad_id, packed)
