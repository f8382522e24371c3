"""Preparing a token store: records streamed in, tokenized in batches (in worker processes), written to disk.

:func:`prepare_store` returns the :class:`~loraq.data.store.TokenStore` of a
source under given settings, building it only when the cache has none. The
build streams the source's items in chunks of :data:`CHUNK_ITEMS`; each chunk
is parsed, checked, converted to samples and tokenized
(:func:`~loraq.data.encode.encode_samples`) in one function, :func:`encode_chunk`,
which runs in worker processes when there are cores to spare, at most
``2 x workers`` chunks ahead of the writer. Chunks are written in source
order, so the store does not depend on the number of workers. Memory is
bounded by the chunks in flight, not by the dataset.

Records follow the same rules as :func:`~loraq.data.formats.to_samples`: the
format is detected from the first record (with skipping: the first that has
one) and every record must be in it; a bad record stops the build with its
``file:line``, or, with ``skip_bad``, is counted and left out.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraq import faults
from loraq.choices import DATA_FORMATS
from loraq.data.encode import Encoded, FastEncoder, encode_samples
from loraq.data.formats import _check_same_format, _format_of_first, guess_format, to_sample
from loraq.data.readers import Record
from loraq.data.store import StoreWriter, TokenStore, id_dtype, store_key, stores_root, tokenizer_fingerprint
from loraq.data.tokenize import chat_template
from loraq.errors import DataError
from loraq.paths import atomic_dir, file_lock

CHUNK_ITEMS = 1024
SMALL_SOURCE_BYTES = 4 << 20  # below this, worker processes cost more than they save
WORKERS_ENV = "LORAQ_DATA_WORKERS"
MAX_SKIPPED_MESSAGES = 20


@dataclass
class ChunkSettings:
    """What every chunk is processed with (handed to each worker once)."""

    source: Any  # turns items into records (readers.FileSource or sources.HFSource)
    fmt: str
    auto: bool  # the format was detected: check every record against it
    first_where: str
    seq_len: int
    train_on_inputs: bool
    skip_bad: bool
    tokenizer: Any
    encoder: FastEncoder | None


@dataclass
class ChunkResult:
    encoded: Encoded | None = None
    numbers: np.ndarray | None = None
    ordinals: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    error: str | None = None  # the first bad record, when not skipping


def encode_chunk(settings: ChunkSettings, items: list[tuple[int, int, Any]]) -> ChunkResult:
    """Items ``(ordinal, number, payload)`` -> records -> samples -> token arrays."""
    samples, numbers, ordinals, skipped = [], [], [], []
    first = Record({}, settings.first_where)
    for ordinal, number, payload in items:
        try:
            record = settings.source.record(number, payload)
            if settings.auto:
                _check_same_format(record, settings.fmt, first)
            samples.append(to_sample(record, settings.fmt))
        except DataError as exc:
            if not settings.skip_bad:
                return ChunkResult(error=str(exc))
            skipped.append(str(exc))
            continue
        numbers.append(number)
        ordinals.append(ordinal)
    try:
        encoded = encode_samples(samples, settings.tokenizer, settings.seq_len, settings.train_on_inputs,
                                 settings.encoder)
    except DataError as exc:
        return ChunkResult(error=str(exc))
    return ChunkResult(encoded, np.array(numbers, dtype=np.int64), np.array(ordinals, dtype=np.int64), skipped)


def prepare_store(source: Any, tokenizer: Any, *, fmt: str = "auto", seq_len: int, train_on_inputs: bool = False,
                  skip_bad: bool = False, workers: int | None = None,
                  log: Callable[[str], None] | None = None) -> TokenStore:
    """The store of ``source`` with these settings: from the cache, or built now (see the module docstring)."""
    if fmt not in (None, "auto") and fmt not in DATA_FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of: auto, {', '.join(DATA_FORMATS)}")
    log = log or _stderr
    key = store_key(data=source.fingerprint(), tokenizer=tokenizer_fingerprint(tokenizer),
                    chat_template=chat_template(tokenizer), fmt=fmt or "auto", seq_len=seq_len,
                    train_on_inputs=train_on_inputs, skip_bad=skip_bad)
    store = TokenStore.open(stores_root() / key)  # a read-only cache still serves the stores it has
    if store is not None:
        return store
    root = _writable_root(log)
    final = root / key
    with file_lock(root / f".{key}.lock", waiting=f"tokenizing {source.name} with these settings"):
        store = TokenStore.open(final)  # another process may have built it while this one waited
        if store is not None:
            return store
        for stale in list(root.glob(f".{key}.tmp-*")) + ([final] if final.exists() else []):
            shutil.rmtree(stale, ignore_errors=True)  # a killed build's leftovers (no one else holds the lock)
        try:
            with atomic_dir(final) as tmp:
                build_store(source, tokenizer, tmp, fmt=fmt, seq_len=seq_len, train_on_inputs=train_on_inputs,
                            skip_bad=skip_bad, workers=workers, log=log)
        except OSError as exc:
            raise DataError(f"{root}: cannot write the token store for {source.name} ({exc.strerror or exc}); free "
                            f"space there or point LORAQ_CACHE at another disk") from None
    store = TokenStore.open(final)
    if store is None:
        raise RuntimeError(f"the token store just written to {final} does not read back")
    return store


def _writable_root(log: Callable[[str], None]) -> Path:
    root = stores_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")
        probe.close()
        return root
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="loraq-tokens-"))
        log(f"loraq: warning: cannot write to {root} ({exc.strerror or exc}); the token store goes to {fallback} "
            f"for this run (set LORAQ_CACHE to a writable folder to keep it)")
        return fallback


def build_store(source: Any, tokenizer: Any, folder: Path, *, fmt: str, seq_len: int, train_on_inputs: bool,
                skip_bad: bool, workers: int | None, log: Callable[[str], None]) -> None:
    """Write the store's files into ``folder`` (the caller makes it appear atomically)."""
    items = ((ordinal, number, payload) for ordinal, (number, payload) in enumerate(source.items()))
    auto = fmt in (None, "auto")
    first_where = ""
    if auto:
        fmt, first_where, peeked = detect_format(source, items, skip_bad)
        items = itertools.chain(peeked, items)
    settings = ChunkSettings(source, fmt, auto, first_where, seq_len, train_on_inputs, skip_bad, tokenizer,
                             FastEncoder.of(tokenizer))
    writer = StoreWriter(folder, id_dtype(len(tokenizer)))
    skipped: list[str] = []
    skipped_count = 0
    progress = Progress(source, log)
    try:
        for result in run_chunks(settings, _chunks(items, CHUNK_ITEMS), resolve_workers(source, workers)):
            if result.error is not None:
                raise DataError(result.error)
            skipped_count += len(result.skipped)
            skipped.extend(result.skipped[:MAX_SKIPPED_MESSAGES - len(skipped)])
            writer.add(result.encoded, result.numbers, result.ordinals)
            faults.point("data-store-write", folder)
            progress.update(writer.samples)
    except BaseException:
        writer.close()
        raise
    progress.done(writer.samples, writer.tokens)
    if writer.samples == 0:
        writer.close()
        first = f" (first problem: {skipped[0]})" if skipped else ""
        raise DataError(f"{source.name}: no record is usable as {fmt}{first}; fix the data")
    kind = to_sample_kind(fmt)
    writer.finish({"format": fmt, "kind": kind, "row_style": bool(source.row_style), "skipped": skipped_count,
                   "skipped_messages": skipped, "seq_len": seq_len, "train_on_inputs": train_on_inputs,
                   "vocab_size": len(tokenizer)})


def to_sample_kind(fmt: str) -> str:
    return {"completion": "completion", "text": "text"}.get(fmt, "chat")


def detect_format(source: Any, items: Iterator, skip_bad: bool) -> tuple[str, str, list]:
    """(format, where of the record it was read from, the items consumed): as to_samples(fmt="auto") decides."""
    peeked, first_readable = [], None
    for item in items:
        peeked.append(item)
        try:
            record = source.record(item[1], item[2])
        except DataError:
            if not skip_bad:
                raise
            continue
        first_readable = first_readable or record
        if not skip_bad or guess_format(record.data):
            return _format_of_first(record), record.where, peeked
    if first_readable is None:
        raise DataError(f"{source.name}: the file holds no records; add at least one example")
    _format_of_first(first_readable)  # raises: no record has a format
    raise AssertionError("unreachable")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def resolve_workers(source: Any, workers: int | None) -> int:
    """Worker processes: as asked (``LORAQ_DATA_WORKERS`` or the argument), else one per usable core when the
    source is big enough to be worth it; 0 means in this process."""
    env = os.environ.get(WORKERS_ENV, "").strip()
    if workers is None and env:
        workers = int(env)
    if workers is not None:
        return max(0, workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = getattr(source, "size", None)
    if size is None:
        size = len(getattr(source, "dataset", ())) * 500
    return cores if cores > 1 and size >= SMALL_SOURCE_BYTES else 0


_WORKER_SETTINGS: ChunkSettings | None = None


def _init_worker(settings: ChunkSettings) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the preparing process dies (killed mid-build, it would linger)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_encode(items: list) -> ChunkResult:
    return encode_chunk(_WORKER_SETTINGS, items)


def run_chunks(settings: ChunkSettings, chunks: Iterator[list], workers: int) -> Iterator[ChunkResult]:
    """Each chunk's result, in order: in this process, or in ``workers`` forked processes."""
    if workers <= 0:
        for chunk in chunks:
            yield encode_chunk(settings, chunk)
        return
    import multiprocessing

    # fork: the workers inherit the loaded tokenizer instead of loading it again (as torch's DataLoader does)
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """A progress line on stderr (examples, examples/s, ETA) for preparations longer than a few seconds."""

    def __init__(self, source: Any, log: Callable[[str], None], after_seconds: float = 3.0):
        self.source, self.log = source, log
        self.start = self.last = time.perf_counter()
        self.after = after_seconds
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, examples: int) -> None:
        now = time.perf_counter()
        if now - self.start < self.after or now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last, self.shown = now, True
        rate = examples / (now - self.start)
        fraction = self.source.progress()
        eta = ""
        if fraction:
            eta = f", {100 * fraction:.0f}%, ETA {_clock((now - self.start) * (1 - fraction) / fraction)}"
        line = f"loraq: tokenizing {self.source.name}: {examples:,} examples, {rate:,.0f}/s{eta}"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
        else:
            self.log(line)

    def done(self, examples: int, tokens: int) -> None:
        seconds = time.perf_counter() - self.start
        if self.tty and self.shown:
            sys.stderr.write("\r\x1b[K")
        if seconds >= self.after:
            self.log(f"loraq: tokenized {self.source.name}: {examples:,} examples, {tokens:,} tokens in "
                     f"{_clock(seconds)} ({examples / seconds:,.0f} examples/s)")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
