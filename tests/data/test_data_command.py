"""`loraq data`: names the format of each kind of file, counts tokens, marks trained tokens, fails in one line."""
from __future__ import annotations

import json

import pytest
from data_helpers import ALPACA, CHAT, COMPLETION, SHAREGPT, TEXT, write_jsonl

from loraq.cli import main


@pytest.mark.parametrize("record, fmt", [(CHAT, "chat"), (SHAREGPT, "sharegpt"), (ALPACA, "alpaca"),
                                         (COMPLETION, "completion"), (TEXT, "text")])
def test_each_format_is_named(tmp_path, tiny_llama_dir, capsys, record, fmt):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [record] * 3)
    assert main(["data", str(path), "--model", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert f"format:     {fmt} (detected)" in out and "records:    3" in out


def test_json_counts_and_marked_example(tmp_path, tiny_llama_dir, tiny_tokenizer, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [COMPLETION, {"prompt": "Hello", "completion": " world"}])
    assert main(["data", str(path), "--model", str(tiny_llama_dir), "--json", "--show", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    ids = [tiny_tokenizer("The sky is blue.")["input_ids"], tiny_tokenizer("Hello world")["input_ids"]]
    answers = [tiny_tokenizer(" blue.", add_special_tokens=False)["input_ids"],
               tiny_tokenizer(" world", add_special_tokens=False)["input_ids"]]
    assert report["format"] == "completion" and report["examples"] == 2
    assert report["tokens"] == sum(len(i) + 1 for i in ids)  # + EOS each
    assert report["trained_tokens"] == sum(len(a) + 1 for a in answers)
    assert [e["text"] for e in report["examples_shown"]] == ["The sky is[[ blue.<|im_end|>]]",
                                                              "Hello[[ world<|im_end|>]]"]


def test_truncation_is_reported(tmp_path, tiny_llama_dir, capsys):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 50}]}
    path = write_jsonl(tmp_path / "d.jsonl", [long, CHAT])
    assert main(["data", str(path), "--model", str(tiny_llama_dir), "--seq-len", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["truncated"], report["dropped"], report["tokens_per_example"]["max"]) == (1, 0, 32)


def test_broken_third_line_exits_2_with_the_line(tmp_path, tiny_llama_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + '\n{"messages": [\n', encoding="utf-8")
    assert main(["data", str(path), "--model", str(tiny_llama_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loraq: error: ") and f"{path}:3:" in err
    assert "Traceback" not in err
