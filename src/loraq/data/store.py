"""The token store: one dataset's tokenized samples on disk, read through memory maps.

A store is a folder ``<cache>/tokens/<key>/`` (``loraq.paths.cache_dir()``),
``key`` a sha256 of everything its content depends on (:func:`store_key`:
the data's content hash, the tokenizer, the chat template, the format asked
for, seq-len, the masking settings, whether bad records are skipped,
:data:`STORE_VERSION` and loraq's version, so that a release that tokenizes
differently never reads an older store). Files, all little-endian, ``n`` samples, ``T`` tokens:

==================  ==========================  ==========================================
``ids.bin``         uint16 (vocab <= 65536) or   every sample's token ids, one after another
                    uint32, ``[T]``              (truncated to seq-len; text: each document + EOS)
``mask.bin``        uint8, ``[ceil(T / 8)]``     1 bit per token, ``np.packbits`` order (first token
                                                 in the high bit): the label is the token, else -100
``offsets.bin``     int64, ``[n + 1]``           sample ``s`` is tokens ``offsets[s]:offsets[s + 1]``
``trained.bin``     int32, ``[n]``               trained labels after the first position
``truncated.bin``   uint8, ``[n]``               1 when seq-len cut the sample
``numbers.bin``     int64, ``[n]``               the line (or row) it came from, for ``file:line``
``ordinals.bin``    int64, ``[n]``               its place among the source's items (to read it again)
``meta.json``       JSON                         version, counts, dtype, format, skipped records
==================  ==========================  ==========================================

A store is written in a temporary sibling folder and renamed into place
(``loraq.paths.atomic_dir``) with ``meta.json`` written last, under a lock
file per key: the first process to take the lock builds, every other one
(the other ranks of a run, a second run on the same data) waits and then
reads the finished store. A folder left by a killed build keeps its
temporary name; it is never opened, and the next build removes it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from loraq.paths import atomic_write_text, cache_dir

STORE_VERSION = 1
SAMPLE_FILES = {"offsets": np.int64, "trained": np.int32, "truncated": np.uint8, "numbers": np.int64,
                "ordinals": np.int64}


def stores_root() -> Path:
    """Where stores live: ``<loraq cache>/tokens``."""
    return cache_dir() / "tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides token ids: the backend's full JSON (vocab, merges, normaliser, ...) or, for a
    tokenizer without one, its vocabulary; its class, special tokens and added tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode("utf-8"))
    added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    digest.update(json.dumps(added, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def store_key(*, data: str, tokenizer: str, chat_template: str, fmt: str, seq_len: int, train_on_inputs: bool,
              skip_bad: bool) -> str:
    """The store's name: sha256 over its inputs (each already a fingerprint or a plain setting)."""
    from loraq import __version__

    parts = {"version": STORE_VERSION, "loraq": __version__, "data": data, "tokenizer": tokenizer,
             "chat_template": hashlib.sha256(chat_template.encode("utf-8")).hexdigest(), "format": fmt,
             "seq_len": seq_len, "train_on_inputs": train_on_inputs, "skip_bad": skip_bad}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class StoreWriter:
    """Appends batches of encoded samples to the files of a store being built in ``folder``."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder, self.dtype = Path(folder), np.dtype(dtype)
        self.files = {name: open(self.folder / f"{name}.bin", "wb") for name in ("ids", "mask", *SAMPLE_FILES)}
        self.samples = self.tokens = 0
        self.longest = 0
        self._bits = np.zeros(0, dtype=bool)  # mask bits not yet written (fewer than 8)
        self._write("offsets", np.zeros(1, dtype=np.int64))

    def _write(self, name: str, array: np.ndarray) -> None:
        self.files[name].write(np.ascontiguousarray(array).tobytes())

    def add(self, encoded: Any, numbers: np.ndarray, ordinals: np.ndarray) -> None:
        """One batch: an :class:`~loraq.data.encode.Encoded` and each sample's line number and item ordinal."""
        if len(encoded.lengths) == 0:
            return
        if len(encoded.ids) and int(encoded.ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(encoded.ids.max())} does not fit {self.dtype}")
        self._write("ids", encoded.ids.astype(self.dtype))
        bits = np.concatenate([self._bits, encoded.trained])
        whole = len(bits) // 8 * 8
        self._write("mask", np.packbits(bits[:whole]))
        self._bits = bits[whole:]
        self._write("offsets", self.tokens + np.cumsum(encoded.lengths, dtype=np.int64))
        self._write("trained", encoded.num_trained.astype(np.int32))
        self._write("truncated", encoded.truncated.astype(np.uint8))
        self._write("numbers", np.asarray(numbers, dtype=np.int64))
        self._write("ordinals", np.asarray(ordinals, dtype=np.int64))
        self.samples += len(encoded.lengths)
        self.tokens += int(encoded.lengths.sum())
        self.longest = max(self.longest, int(encoded.lengths.max()))

    def finish(self, meta: dict) -> None:
        """Flush the last mask bits, close the files and write ``meta.json`` (last: a store without it is not one)."""
        if len(self._bits):
            self._write("mask", np.packbits(self._bits))
        for fh in self.files.values():
            fh.close()
        meta = dict(meta, version=STORE_VERSION, samples=self.samples, tokens=self.tokens, dtype=self.dtype.name,
                    longest=self.longest)
        atomic_write_text(self.folder / "meta.json", json.dumps(meta, indent=1))

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


@dataclass
class TokenStore:
    """A finished store, memory-mapped (nothing is read until a sample is asked for)."""

    folder: Path
    meta: dict
    ids: np.ndarray
    mask_bits: np.ndarray
    offsets: np.ndarray
    trained: np.ndarray
    truncated: np.ndarray
    numbers: np.ndarray
    ordinals: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.meta["samples"])

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def open(cls, folder: Path) -> TokenStore | None:
        """The store in ``folder``, or None when there is none or it is not complete and consistent."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("version") != STORE_VERSION:
            return None
        n, tokens = int(meta["samples"]), int(meta["tokens"])
        dtype = np.dtype(meta["dtype"])
        expected = {"ids": tokens * dtype.itemsize, "mask": (tokens + 7) // 8}
        expected.update({name: (n + (name == "offsets")) * np.dtype(t).itemsize for name, t in SAMPLE_FILES.items()})
        for name, size in expected.items():
            try:
                if os.path.getsize(folder / f"{name}.bin") != size:
                    return None
            except OSError:
                return None
        arrays = {"ids": _map(folder / "ids.bin", dtype), "mask_bits": _map(folder / "mask.bin", np.uint8)}
        arrays.update({name: _map(folder / f"{name}.bin", t) for name, t in SAMPLE_FILES.items()})
        if arrays["offsets"][-1] != tokens:
            return None
        return cls(folder=folder, meta=meta, **arrays)

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.ids[start:stop], dtype=np.int64)

    def trained_mask(self, start: int, stop: int) -> np.ndarray:
        """Bool per token of ``[start, stop)``: its label is the token (else -100)."""
        if stop <= start:
            return np.zeros(0, dtype=bool)
        first, last = start // 8, (stop + 7) // 8
        bits = np.unpackbits(self.mask_bits[first:last])
        return bits[start - first * 8:stop - first * 8].astype(bool)


def _map(path: Path, dtype) -> np.ndarray:
    """A read-only memory map (an empty file gives an empty array: mmap cannot map zero bytes)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
