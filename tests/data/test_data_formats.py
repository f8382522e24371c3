"""formats.py: detection, the override, conversion to messages, and field mistakes."""
from __future__ import annotations

import pytest
from data_helpers import ALPACA, CHAT, COMPLETION, SHAREGPT, TEXT, one_line_error

from loraq.data.formats import detect_format, to_samples
from loraq.data.readers import Record


def recs(*datas) -> list[Record]:
    return [Record(d, f"f.jsonl:{i + 1}") for i, d in enumerate(datas)]


@pytest.mark.parametrize("record, fmt", [(CHAT, "chat"), (SHAREGPT, "sharegpt"), (ALPACA, "alpaca"),
                                         (COMPLETION, "completion"), (TEXT, "text")])
def test_each_format_is_detected(record, fmt):
    assert detect_format(recs(record, record)) == fmt


def test_disagreeing_record_is_named():
    one_line_error(lambda: detect_format(recs(CHAT, CHAT, ALPACA)), "f.jsonl:3", "alpaca", "chat", "--format")
    one_line_error(lambda: detect_format(recs(CHAT, {"question": "?"})), "f.jsonl:2", "fits no format", "question")
    one_line_error(lambda: detect_format(recs({"foo": 1})), "f.jsonl:1", "cannot tell", "--format")


def test_conversions_to_messages():
    _, [s] = to_samples(recs(SHAREGPT))
    assert s.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    _, [a, b] = to_samples(recs(ALPACA,
                                {"instruction": "Greet.", "input": "", "output": "Hello", "system": "Be kind."}))
    assert a.messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                          {"role": "assistant", "content": "5"}]
    assert b.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Greet."},
                          {"role": "assistant", "content": "Hello"}]
    _, [c] = to_samples(recs(COMPLETION))
    assert (c.kind, c.prompt, c.completion) == ("completion", "The sky is", " blue.")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c", "name": "bot"}]}
    _, [p] = to_samples(recs(parts))
    assert p.messages == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]


def test_explicit_format_overrides_detection():
    both = {"prompt": "p", "completion": "c", "text": "t"}
    assert to_samples(recs(both), "text")[1][0].text == "t"
    assert to_samples(recs(both))[0] == "completion"
    one_line_error(lambda: to_samples(recs(CHAT), "alpaca"), "f.jsonl:1", "missing field 'instruction'")


@pytest.mark.parametrize("record, needles", [
    ({"messages": [{"role": "bot", "content": "x"}]}, ["unknown role 'bot'", "assistant"]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
     ["message 2", "empty content"]),
    ({"messages": [{"role": "user", "content": "x"}]}, ["no assistant turn"]),
    ({"messages": []}, ["empty"]),
    ({"messages": "hello"}, ["'messages' must be a list"]),
    ({"messages": [{"role": "user"}]}, ["message 1 has no 'content'"]),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     ["must be a string", "a number"]),
    ({"messages": ["hi"]}, ["message 1 must be an object"]),
    ({"conversations": [{"from": "robot", "value": "x"}]}, ["unknown speaker 'robot'"]),
    ({"conversations": [{"from": "human"}]}, ["turn 1 has no 'value'"]),
    ({"instruction": "", "output": "x"}, ["'instruction' is empty"]),
    ({"instruction": "x", "output": 3}, ["'output' must be a string"]),
    ({"prompt": "x", "completion": ""}, ["'completion' is empty"]),
    ({"text": None}, ["missing field 'text'"]),
])
def test_field_mistakes_are_one_line_with_the_line(record, needles):
    one_line_error(lambda: to_samples(recs(record)), "f.jsonl:1", *needles)


def test_skipping_keeps_the_good_records():
    skipped: list[str] = []
    fmt, samples = to_samples(recs({"junk": 1}, CHAT, ALPACA, {"messages": [{"role": "x", "content": "y"}]}, CHAT),
                              skipped=skipped)
    assert fmt == "chat" and [s.where for s in samples] == ["f.jsonl:2", "f.jsonl:5"]
    assert [m.split(":")[1] for m in skipped] == ["1", "3", "4"]
