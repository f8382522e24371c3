"""Reading dataset files into records.

Contract: :func:`read_records` returns every record of a file as a
:class:`Record` (the dict plus where it came from, ``file:line``), in file
order. Supported: JSON Lines (``.jsonl``, ``.ndjson``), JSON (an array of
objects, or an object whose ``"data"`` key holds that array), CSV (a header
row, then one record per row; every value a string) and Parquet (through
pyarrow, when installed).

For files of any size, :func:`open_file` gives a :class:`FileSource`: its
``items()`` yield ``(number, payload)`` one at a time (JSON Lines and Parquet
stream, so a file larger than memory is fine; JSON and CSV are read whole),
and ``record(number, payload)`` turns one into a Record or raises its
DataError. Parsing is left to ``record`` so that worker processes can do it.

Every problem a user can cause is a :class:`~loraq.errors.DataError` of one
line that names the file, the line where it applies, and what to do.
Whether a record's *fields* make sense is not checked here (see formats.py).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraq.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet"}
# files people pass as --data by mistake: weights, archives
NOT_DATA = {".bin": "a weight file", ".pt": "a weight file", ".pth": "a weight file", ".ckpt": "a weight file",
            ".safetensors": "a weight file", ".gguf": "a model file", ".onnx": "a model file", ".npy": "a NumPy array",
            ".npz": "a NumPy archive", ".gz": "a compressed file", ".zip": "a compressed file",
            ".bz2": "a compressed file", ".xz": "a compressed file", ".zst": "a compressed file",
            ".tar": "an archive", ".pkl": "a pickle file", ".pickle": "a pickle file"}


@dataclass(frozen=True)
class Record:
    """One record of a dataset file: its fields and where it is (``path:line``, or ``path: row N``)."""

    data: dict[str, Any]
    where: str


def read_records(path: str | Path, skipped: list[str] | None = None) -> list[Record]:
    """All records of ``path`` in file order; DataError (one line) on anything unreadable or empty.

    With a ``skipped`` list, a bad record (malformed line, not an object, bad
    CSV row) is left out and its error message appended instead; a file that
    cannot be read at all, or holds no good record, still raises.
    """
    source = open_file(path)
    records: list[Record] = []
    for number, payload in source.items():
        _keep(records, lambda number=number, payload=payload: source.record(number, payload), skipped)
    if not records:
        raise DataError(f"{source.name}: the file holds no records; add at least one example")
    return records


def open_file(path: str | Path) -> FileSource:
    """The dataset file at ``path`` as a :class:`FileSource`; DataError when it is missing or not a dataset."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; give a .jsonl, .json, .csv or .parquet dataset")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a dataset file; give a .jsonl, .json, .csv or .parquet file")
    kind = SUFFIXES.get(p.suffix.lower())
    if p.suffix.lower() in NOT_DATA:
        raise DataError(f"{p}: {NOT_DATA[p.suffix.lower()]} ({p.suffix}), not a dataset; give a .jsonl, .json, .csv "
                        f"or .parquet file"
                        + (" (decompress it first)" if "compress" in NOT_DATA[p.suffix.lower()] else ""))
    if kind is None:
        # no known suffix: JSON if it opens like JSON, else JSON Lines
        with open(p, "rb") as fh:
            kind = "json" if fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[") else "jsonl"
    return FileSource(p, kind)


class FileSource:
    """One dataset file, read item by item (see the module docstring)."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self.name = str(path)
        self.row_style = kind == "parquet"  # where: "path: row N" rather than "path:N"
        self.size = path.stat().st_size
        self.bytes_read = 0  # for progress: how far items() has got

    def where(self, number: int) -> str:
        return f"{self.name}: row {number}" if self.row_style else f"{self.name}:{number}"

    def fingerprint(self) -> str:
        """sha256 of the file's bytes."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    def progress(self) -> float | None:
        return self.bytes_read / self.size if self.size else None

    def items(self) -> Iterator[tuple[int, Any]]:
        """``(number, payload)`` in file order: number is the line (row for Parquet) where the record starts."""
        if self.kind == "jsonl":
            return self._jsonl_lines()
        if self.kind == "parquet":
            return self._parquet_rows()
        if self.kind == "json":
            return self._json_items()
        return self._csv_rows()

    def record(self, number: int, payload: Any) -> Record:
        """The item as a Record; DataError (one line, with its file:line) when it is not a usable record."""
        where = self.where(number)
        if self.kind == "jsonl":
            return _jsonl_record(payload, where)
        if self.kind == "csv":
            return _csv_record(payload, where)
        return Record(_object_or_error(payload, where), where)

    def _jsonl_lines(self) -> Iterator[tuple[int, str]]:
        seen_text = False
        with open(self.path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                line = _decode_line(raw, number, self.bytes_read, self.path)
                self.bytes_read += len(raw)
                if line.strip():
                    seen_text = True
                    yield number, line
        self.bytes_read = self.size
        if not seen_text:
            raise DataError(f"{self.path}: the file is empty; add at least one example")

    def _json_items(self) -> Iterator[tuple[int, Any]]:
        items, lines = _json_document(self.path, _read_text(self.path))
        self.bytes_read = self.size
        yield from zip(lines, items)

    def _csv_rows(self) -> Iterator[tuple[int, dict]]:
        reader = csv.DictReader(io.StringIO(_read_text(self.path), newline=""))
        header = reader.fieldnames or []
        if not header or any(not (name or "").strip() for name in header):
            raise DataError(f"{self.path}:1: the CSV header must name every column (e.g. instruction,input,output)")
        try:
            for row in reader:
                if any(value not in ("", None) for value in row.values()):
                    yield reader.line_num, row
        except csv.Error as exc:
            raise DataError(f"{self.path}:{reader.line_num}: malformed CSV ({exc}); fix the quoting") from None
        self.bytes_read = self.size

    def _parquet_rows(self) -> Iterator[tuple[int, dict]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{self.path}: reading Parquet needs pyarrow; run `pip install pyarrow` or convert the "
                            f"file to JSON Lines") from None
        try:
            table = pq.ParquetFile(self.path)
            batches = table.iter_batches(batch_size=1024)
            number = 0
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
                self.bytes_read = self.size * number // max(table.metadata.num_rows, 1)
        except DataError:
            raise
        except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
            raise DataError(f"{self.path}: not a readable Parquet file ({type(exc).__name__}: {exc}); "
                            f"check the file") from None


def _decode_line(raw: bytes, number: int, offset: int, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{number}: bytes that are not UTF-8 (byte {offset + exc.start}); save the file as "
                        f"UTF-8") from None


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p}: the file is empty; add at least one example")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: bytes that are not UTF-8 (byte {exc.start}); save the file as UTF-8") from None


def _object_or_error(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: a record must be a JSON object like {{\"messages\": [...]}}, "
                        f"got {_json_kind(value)}")
    return value


def _keep(records: list[Record], make, skipped: list[str] | None) -> None:
    """Append ``make()``'s record; a DataError is raised, or recorded in ``skipped`` when given."""
    try:
        records.append(make())
    except DataError as exc:
        if skipped is None:
            raise
        skipped.append(str(exc))


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _jsonl_record(line: str, where: str) -> Record:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                        f"each line must be one complete JSON object") from None
    return Record(_object_or_error(value, where), where)


def _json_document(p: Path, text: str) -> tuple[list, list[int]]:
    """(the items of a JSON dataset document, the line where each starts)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg.startswith("Extra data"):
            hint = " (several JSON values: is this JSON Lines? name it .jsonl)"
        raise DataError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}){hint}; "
                        "fix the syntax") from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        items = document["data"]
    elif isinstance(document, list):
        items = document
    else:
        raise DataError(f"{p}: a JSON dataset must be an array of objects or {{\"data\": [...]}}, "
                        f"got {_json_kind(document)}{' without a data array' if isinstance(document, dict) else ''}")
    return items, _array_item_lines(text, len(items))


def _array_item_lines(text: str, count: int) -> list[int]:
    """Line number where each item of the dataset array starts (the text is known to be valid JSON).

    Walks the document with ``raw_decode``: into the top-level array, or into
    the top-level object's ``"data"`` value.
    """
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if text[pos] == "{":
        pos = _skip_space(text, pos + 1)
        while True:
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip_space(text, _skip_space(text, pos) + 1)  # past ':'
            if key == "data" and text[pos] == "[":
                break
            _, pos = decoder.raw_decode(text, pos)
            pos = _skip_space(text, _skip_space(text, pos) + 1)  # past ','
    starts = []
    pos = _skip_space(text, pos + 1)  # past '['
    while len(starts) < count:
        starts.append(pos)
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, _skip_space(text, pos) + 1)  # past ',' or ']'
    lines, line, last = [], 1, 0
    for start in starts:
        line += text.count("\n", last, start)
        last = start
        lines.append(line)
    return lines


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv_record(row: dict, where: str) -> Record:
    if None in row:  # more cells than header names (DictReader puts the extra ones under None)
        names = len(row) - 1
        raise DataError(f"{where}: {names + len(row[None])} cells but the header names {names} "
                        f"columns; quote cells that hold commas")
    return Record({k: ("" if v is None else v) for k, v in row.items()}, where)
