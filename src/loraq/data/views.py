"""Examples and rows of a token store, read on demand: sequences that look like the lists build_data used to hold.

:class:`StoreExamples` is a ``Sequence[Example]`` over one split of a store;
item ``i`` is made from the memory-mapped ids and mask bits when asked for
(nothing of the whole set is held in Python objects). ``chat`` and
``completion`` examples are stored samples (those with a trained token);
``text`` examples are ``seq_len`` chunks of the split's documents joined in
order (each already ending in EOS), as
:func:`~loraq.data.tokenize.tokenize_documents` cuts them.

:class:`StoreRows` is a ``Sequence[Row]`` (a row: a tuple of examples) over
them: one example per row, or the rows of
:func:`~loraq.data.packing.pack_lengths`. ``BatchIterator`` and ``collate``
take these as they took lists.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from loraq.data.store import TokenStore
from loraq.data.tokenize import IGNORE_INDEX, Example


class TokenStream:
    """Tokens of some of a store's samples, one after another, addressed by position in that concatenation."""

    def __init__(self, store: TokenStore, samples: np.ndarray | None):
        self.store = store
        if samples is None or (len(samples) == store.samples and np.array_equal(samples, np.arange(store.samples))):
            self.pieces = None  # the whole store, in order: positions are the store's own
            self.length = int(store.offsets[-1])
        else:
            self.piece_starts = np.asarray(store.offsets[samples], dtype=np.int64)
            lengths = np.asarray(store.offsets[samples + 1], dtype=np.int64) - self.piece_starts
            self.pieces = np.concatenate([[0], np.cumsum(lengths)])
            self.length = int(self.pieces[-1])

    def _spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Store ranges covering stream positions ``[start, stop)``."""
        if self.pieces is None:
            return [(start, stop)]
        spans = []
        k = int(np.searchsorted(self.pieces, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.pieces[k + 1]))
            base = int(self.piece_starts[k]) - int(self.pieces[k])
            spans.append((base + start, base + end))
            start, k = end, k + 1
        return spans

    def ids(self, start: int, stop: int) -> np.ndarray:
        parts = [self.store.token_ids(a, b) for a, b in self._spans(start, stop)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def trained(self, start: int, stop: int) -> np.ndarray:
        parts = [self.store.trained_mask(a, b) for a, b in self._spans(start, stop)]
        return np.concatenate(parts) if parts else np.zeros(0, bool)


class _Indexed(Sequence):
    """A ``Sequence`` over ``len(self)`` items built by ``_item(i)``: slices (as lists), negative indices,
    IndexError past either end."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index)

    def _item(self, index: int):
        raise NotImplementedError


class StoreExamples(_Indexed):
    """``Sequence[Example]``: example ``i`` is stream positions ``starts[i]:starts[i] + lengths[i]``."""

    def __init__(self, stream: TokenStream, starts: np.ndarray, lengths: np.ndarray, num_trained: np.ndarray,
                 where: Callable[[int], str], all_trained: bool = False):
        self.stream = stream
        self.starts, self.lengths, self.num_trained = starts, lengths, num_trained
        self.where, self.all_trained = where, all_trained

    def __len__(self) -> int:
        return len(self.lengths)

    def _item(self, index: int) -> Example:
        start = int(self.starts[index])
        stop = start + int(self.lengths[index])
        ids = self.stream.ids(start, stop).tolist()
        if self.all_trained:
            return Example(ids, list(ids), self.where(index))
        mask = self.stream.trained(start, stop).tolist()
        return Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], self.where(index))


def sample_examples(store: TokenStore, samples: np.ndarray, where: Callable[[int], str]) -> StoreExamples:
    """Stored samples (chat, completion) as examples, in order; ``where(number)`` names a source line."""
    numbers = np.asarray(store.numbers[samples])
    return StoreExamples(TokenStream(store, None), np.asarray(store.offsets[samples], dtype=np.int64),
                         np.asarray(store.lengths[samples], dtype=np.int64),
                         np.asarray(store.trained[samples], dtype=np.int64), lambda i: where(int(numbers[i])))


def document_chunks(store: TokenStore, documents: np.ndarray, seq_len: int, name: str) -> StoreExamples:
    """Text documents joined in order and cut into ``seq_len`` chunks; a last chunk of one token is left out."""
    stream = TokenStream(store, documents)
    starts = np.arange(0, stream.length, seq_len, dtype=np.int64)
    lengths = np.minimum(starts + seq_len, stream.length) - starts
    keep = lengths > 1
    starts, lengths = starts[keep], lengths[keep]
    return StoreExamples(stream, starts, lengths, lengths - 1,
                         lambda i: f"{name}: tokens {int(starts[i])}..{int(starts[i] + lengths[i])}", all_trained=True)


class StoreRows(_Indexed):
    """``Sequence[Row]``: row ``r`` holds examples ``members[row_starts[r]:row_starts[r + 1]]`` (None: one each)."""

    def __init__(self, examples: StoreExamples, row_starts: np.ndarray | None = None,
                 members: np.ndarray | None = None):
        self.examples, self.row_starts, self.members = examples, row_starts, members

    def __len__(self) -> int:
        return len(self.examples) if self.row_starts is None else len(self.row_starts) - 1

    def _item(self, index: int) -> tuple[Example, ...]:
        if self.row_starts is None:
            return (self.examples[index],)
        start, stop = int(self.row_starts[index]), int(self.row_starts[index + 1])
        return tuple(self.examples[int(m)] for m in self.members[start:stop])

    def row_lengths(self) -> np.ndarray:
        """Tokens per row."""
        if self.row_starts is None:
            return self.examples.lengths
        if len(self.members) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.examples.lengths[self.members], self.row_starts[:-1])
