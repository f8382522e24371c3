"""Reading dataset files into records.

Contract: :func:`read_records` returns every record of a file as a
:class:`Record` (the dict plus where it came from, ``file:line``), in file
order. Supported: JSON Lines (``.jsonl``, ``.ndjson``), JSON (an array of
objects, or an object whose ``"data"`` key holds that array), CSV (a header
row, then one record per row; every value a string) and Parquet (through
pyarrow, when installed).

Every problem a user can cause is a :class:`~loraq.errors.DataError` of one
line that names the file, the line where it applies, and what to do.
Whether a record's *fields* make sense is not checked here (see formats.py).
"""
from __future__ import annotations

import csv
import io
import json
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
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; give a .jsonl, .json, .csv or .parquet dataset")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a dataset file; give a .jsonl, .json, .csv or .parquet file")
    kind = SUFFIXES.get(p.suffix.lower())
    if p.suffix.lower() in NOT_DATA:
        raise DataError(f"{p}: {NOT_DATA[p.suffix.lower()]} ({p.suffix}), not a dataset; give a .jsonl, .json, .csv "
                        f"or .parquet file" + (" (decompress it first)" if "compress" in NOT_DATA[p.suffix.lower()] else ""))
    if kind == "parquet":
        records = _read_parquet(p, skipped)
    else:
        text = _read_text(p)
        if kind is None:
            # no known suffix: JSON if it opens like JSON, else JSON Lines
            kind = "json" if text.lstrip().startswith("[") else "jsonl"
        reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind]
        records = reader(p, text, skipped)
    if not records:
        raise DataError(f"{p}: the file holds no records; add at least one example")
    return records


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


def _read_jsonl(p: Path, text: str, skipped: list[str] | None) -> list[Record]:
    records: list[Record] = []
    # split on '\n' only: str.splitlines would also cut at U+2028, which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            _keep(records, lambda: _jsonl_record(line, f"{p}:{number}"), skipped)
    return records


def _jsonl_record(line: str, where: str) -> Record:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                        f"each line must be one complete JSON object") from None
    return Record(_object_or_error(value, where), where)


def _read_json(p: Path, text: str, skipped: list[str] | None) -> list[Record]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg.startswith("Extra data"):
            hint = " (several JSON values: is this JSON Lines? name it .jsonl)"
        raise DataError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}){hint}; fix the syntax") from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        items = document["data"]
    elif isinstance(document, list):
        items = document
    else:
        raise DataError(f"{p}: a JSON dataset must be an array of objects or {{\"data\": [...]}}, "
                        f"got {_json_kind(document)}{' without a data array' if isinstance(document, dict) else ''}")
    records: list[Record] = []
    for item, line in zip(items, _array_item_lines(text, len(items))):
        _keep(records, lambda: Record(_object_or_error(item, f"{p}:{line}"), f"{p}:{line}"), skipped)
    return records


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


def _read_csv(p: Path, text: str, skipped: list[str] | None) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if not header or any(not (name or "").strip() for name in header):
        raise DataError(f"{p}:1: the CSV header must name every column (e.g. instruction,input,output)")
    records: list[Record] = []
    try:
        for row in reader:
            if any(value not in ("", None) for value in row.values()):
                _keep(records, lambda: _csv_record(row, header, f"{p}:{reader.line_num}"), skipped)
    except csv.Error as exc:
        raise DataError(f"{p}:{reader.line_num}: malformed CSV ({exc}); fix the quoting") from None
    return records


def _csv_record(row: dict, header: list[str], where: str) -> Record:
    if None in row:  # more cells than header names
        raise DataError(f"{where}: {len(header) + len(row[None])} cells but the header names {len(header)} "
                        f"columns; quote cells that hold commas")
    return Record({k: ("" if v is None else v) for k, v in row.items()}, where)


def _read_parquet(p: Path, skipped: list[str] | None) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow; run `pip install pyarrow` or convert the file to JSON Lines") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{p}: not a readable Parquet file ({type(exc).__name__}: {exc}); check the file") from None
    records: list[Record] = []
    for i, row in enumerate(rows):
        _keep(records, lambda: Record(_object_or_error(row, f"{p}: row {i + 1}"), f"{p}: row {i + 1}"), skipped)
    return records
