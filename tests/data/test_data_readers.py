"""readers.py: every supported file shape, and each user mistake as one DataError line with file:line."""
from __future__ import annotations

import json

import pytest
from data_helpers import CHAT, one_line_error

from loraq.data.readers import read_records


def test_jsonl_records_with_their_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + json.dumps({"text": "a\u2028b"}) + "\n", encoding="utf-8")
    records = read_records(path)
    assert [r.data for r in records] == [CHAT, {"text": "a\u2028b"}]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3"]  # blank line 2 skipped, U+2028 is not a break


def test_json_array_and_data_object_give_item_lines(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"text": "one"},\n\n  {"text": "two",\n   "x": [1, 2]}\n]\n', encoding="utf-8")
    assert [(r.data["text"], r.where) for r in read_records(array)] == [("one", f"{array}:2"), ("two", f"{array}:4")]
    wrapped = tmp_path / "w.json"
    wrapped.write_text('{"version": {"a": [1]},\n "data": [\n{"text": "x"},\n{"text": "y"}]}', encoding="utf-8")
    assert [(r.data["text"], r.where) for r in read_records(wrapped)] == [("x", f"{wrapped}:3"), ("y", f"{wrapped}:4")]


def test_csv_rows_are_string_records(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"Add, please",2 and 3,5\nSay hi,,hi\n', encoding="utf-8")
    records = read_records(path)
    assert [r.data for r in records] == [{"instruction": "Add, please", "input": "2 and 3", "output": "5"},
                                         {"instruction": "Say hi", "input": "", "output": "hi"}]
    assert [r.where for r in records] == [f"{path}:2", f"{path}:3"]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode())
    assert read_records(path)[0].data == CHAT


@pytest.mark.parametrize("name, body, needles", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', [":3:", "malformed JSON"]),
    ("bad.jsonl", '{"text": "a"}\n[1, 2]\n', [":2:", "JSON object", "an array"]),
    ("bad.jsonl", "", ["empty"]),
    ("bad.jsonl", "\n  \n", ["empty"]),
    ("bad.json", '[\n{"text": "a"},\n{"text": }\n]', [":3:", "malformed JSON"]),
    ("bad.json", '{"text": "a"}\n{"text": "b"}\n', [":2:", "Extra data", ".jsonl"]),
    ("bad.json", '{"rows": []}', ["array of objects"]),
    ("bad.json", '[\n{"text": "a"},\n"just a string"\n]', [":3:", "a string"]),
    ("bad.json", "[]", ["no records"]),
    ("bad.csv", "prompt,completion\na,b\nc,d,e\n", [":3:", "cells"]),
])
def test_file_mistakes(tmp_path, name, body, needles):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    one_line_error(lambda: read_records(path), str(path), *needles)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n")
    one_line_error(lambda: read_records(path), f"{path}:2", "UTF-8")


def test_missing_file_folder_and_parquet_without_pyarrow(tmp_path):
    one_line_error(lambda: read_records(tmp_path / "nope.jsonl"), "no such file")
    one_line_error(lambda: read_records(tmp_path), "folder")
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        one_line_error(lambda: read_records(parquet), str(parquet), "pip install pyarrow")
    else:
        one_line_error(lambda: read_records(parquet), str(parquet), "Parquet")


def test_skipping_collects_bad_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a"}\n{oops\n7\n{"text": "b"}\n', encoding="utf-8")
    skipped: list[str] = []
    records = read_records(path, skipped)
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert len(skipped) == 2 and f"{path}:2" in skipped[0] and f"{path}:3" in skipped[1]



def test_parquet_written_by_pyarrow_reads_back_every_record_and_trains_format(tmp_path):
    """Parquet as `datasets.Dataset.to_parquet` writes it (nested list<struct> for chat), read through pyarrow."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from loraq.data.formats import detect_format

    chats = [{"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": f"Say {i}."},
                           {"role": "assistant", "content": str(i)}]} for i in range(5)]
    alpaca = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(4)]
    for name, rows, fmt in (("chat", chats, "chat"), ("alpaca", alpaca, "alpaca")):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        records = read_records(path)
        assert [r.data for r in records] == rows
        assert records[2].where == f"{path}: row 3"
        assert detect_format(records) == fmt
