"""Helpers for the data tests: writing files, decoding trained spans, checking one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraq.errors import DataError

IGNORE = -100


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trained_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decoded maximal runs of consecutive labelled tokens (the reference for what carries loss)."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE:
            assert label == token, "a label must be its own input token (the model shifts)"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def one_line_error(fn, *needles: str) -> str:
    """Run fn, expect a DataError whose message is one line and holds every needle."""
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


CHAT = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
COMPLETION = {"prompt": "The sky is", "completion": " blue."}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
