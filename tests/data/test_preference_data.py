"""Preference pairs: formats, answer-only labels, truncation (prompt kept), bad records, the bundled demo.

The rendering is checked against the tokenizer's own ``apply_chat_template``
(the prompt with the generation prompt is a prefix of every row, and the
scored tokens decode to the answer and its end-of-turn token).
"""
from __future__ import annotations

import json

import pytest

from loraq.data.preference import build_preference_data, read_pairs, to_preference_sample, tokenize_pair
from loraq.data.readers import Record
from loraq.errors import DataError

USER = {"role": "user", "content": "Join red and fox."}


def scored(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != -100])


def pair_of(tok, data: dict, seq_len: int = 256):
    return tokenize_pair(to_preference_sample(Record(data, "p.jsonl:1")), tok, seq_len)


@pytest.mark.parametrize("record", [
    {"prompt": [USER], "chosen": [{"role": "assistant", "content": "red-fox"}],
     "rejected": [{"role": "assistant", "content": "fox red"}]},
    {"prompt": [USER], "chosen": "red-fox", "rejected": "fox red"},  # answers as strings
    {"chosen": [USER, {"role": "assistant", "content": "red-fox"}],  # implicit prompt: the shared messages
     "rejected": [USER, {"role": "assistant", "content": "fox red"}]},
], ids=["explicit", "string-answers", "implicit-prompt"])
def test_conversational_pair_scores_the_answer_only(tiny_tokenizer, record):
    pair, cut = pair_of(tiny_tokenizer, record)
    prompt = tiny_tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    for example, answer in ((pair.chosen, "red-fox"), (pair.rejected, "fox red")):
        assert tiny_tokenizer.decode(example.input_ids).startswith(prompt)
        assert scored(tiny_tokenizer, example) == answer + "<|im_end|>"
    assert not cut and pair.prompt_tokens == len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_history_with_earlier_assistant_turns_is_context(tiny_tokenizer):
    history = [USER, {"role": "assistant", "content": "red-fox"}, {"role": "user", "content": "Again."}]
    pair, _ = pair_of(tiny_tokenizer, {"prompt": history, "chosen": "red-fox", "rejected": "no"})
    assert scored(tiny_tokenizer, pair.chosen) == "red-fox<|im_end|>"  # not the earlier turn too


def test_plain_pair_is_prompt_answer_eos(tiny_tokenizer):
    pair, _ = pair_of(tiny_tokenizer, {"prompt": "Q: 2+3? A:", "chosen": " 5", "rejected": " 6"})
    assert tiny_tokenizer.decode(pair.chosen.input_ids) == "Q: 2+3? A: 5<|im_end|>"
    assert scored(tiny_tokenizer, pair.rejected) == " 6<|im_end|>"


def test_truncation_keeps_the_prompt_and_cuts_the_answers(tiny_tokenizer):
    record = {"prompt": [USER], "chosen": "red " * 40, "rejected": "fox"}
    full, _ = pair_of(tiny_tokenizer, record)
    seq_len = full.prompt_tokens + 5
    pair, cut = pair_of(tiny_tokenizer, record, seq_len)
    assert cut and len(pair.chosen) == seq_len and pair.chosen.input_ids == full.chosen.input_ids[:seq_len]
    assert pair.prompt_tokens == full.prompt_tokens and pair.rejected.input_ids == full.rejected.input_ids
    with pytest.raises(DataError, match=r"p.jsonl:1: the prompt is \d+ tokens .*--seq-len"):
        pair_of(tiny_tokenizer, record, full.prompt_tokens)


@pytest.mark.parametrize("record, words", [
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "the same answer"),
    ({"prompt": "a", "chosen": "x"}, "missing field 'rejected'"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "bot",
                                                                                         "content": "y"}]}, "'bot'"),
    ({"chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
     "no prompt"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "must be a string or a list"),
])
def test_bad_pairs_name_the_record(record, words):
    with pytest.raises(DataError, match="p.jsonl:1") as info:
        to_preference_sample(Record(record, "p.jsonl:1"))
    assert words in str(info.value)


def test_bad_records_are_skipped_and_counted(tiny_tokenizer, tmp_path):
    from loraq.config import TrainConfig

    path = tmp_path / "p.jsonl"
    good = {"prompt": "a", "chosen": " b", "rejected": " c"}
    path.write_text("\n".join(json.dumps(r) for r in (good, {"prompt": "a", "chosen": "x", "rejected": "x"}, good)))
    cfg = TrainConfig(data=str(path), seq_len=64, objective="dpo", skip_bad_examples=True)
    data = build_preference_data(cfg, tiny_tokenizer)
    assert len(data.train) == 2 and data.stats.skipped == 1 and "p.jsonl:2" in data.stats.skipped_messages[0]
    with pytest.raises(DataError, match="p.jsonl:2"):
        build_preference_data(TrainConfig(data=str(path), seq_len=64, objective="dpo"), tiny_tokenizer)


def test_sft_data_for_dpo_and_pairs_for_sft_are_refused(tmp_path):
    from loraq.data.dataset import read_samples

    sft = tmp_path / "chat.jsonl"
    sft.write_text(json.dumps({"messages": [USER, {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="no preference pairs"):
        read_pairs(sft, "auto", None)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('prompt,chosen,rejected\n"a","b","c"\n')
    with pytest.raises(DataError, match="--objective dpo or orpo"):
        read_samples(pairs)
    assert to_preference_sample(Record({"prompt": "a", "chosen": "b", "rejected": "c"}, "x")).kind == "text"


def test_bundled_demo_matches_its_generator():
    from loraq.data.preference_demo import demo_paths, generate

    train, evaluation = generate()
    for path, pairs in zip(demo_paths(), (train, evaluation)):
        assert [json.loads(line) for line in path.read_text().splitlines()] == pairs
    notes = {p["prompt"][1]["content"] for p in train}
    assert not notes & {p["prompt"][1]["content"] for p in evaluation}
    assert all(p["chosen"] != p["rejected"] for p in train + evaluation)


def test_inspect_data_shows_a_pair(tiny_llama_dir, tmp_path):
    import loraq

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [USER], "chosen": "red-fox", "rejected": "fox red"}) + "\n")
    report = loraq.inspect_data(path, model=str(tiny_llama_dir), show=1)
    shown = report["examples_shown"][0]
    assert report["format"] == "preference" and report["pairs"] == 1
    assert "[[red-fox<|im_end|>]]" in shown["text"] and "[[fox red<|im_end|>]]" in shown["rejected_text"]
    assert shown["prompt_tokens"] == report["prompt_tokens"]["max"] > 0


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_file_type_gives_the_same_pairs(tiny_tokenizer, tmp_path, suffix):
    records = [{"prompt": [USER], "chosen": [{"role": "assistant", "content": "red-fox"}],
                "rejected": [{"role": "assistant", "content": "fox red"}]},
               {"prompt": [USER], "chosen": [{"role": "assistant", "content": "fox-red"}],
                "rejected": [{"role": "assistant", "content": "no"}]}]
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == "json":
        path.write_text(json.dumps(records))
    elif suffix == "csv":
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows({k: json.dumps(v) for k, v in r.items()} for r in records)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    pairs = [tokenize_pair(s, tiny_tokenizer, 256)[0] for s in read_pairs(path, "auto", None)]
    assert [scored(tiny_tokenizer, p.chosen) for p in pairs] == ["red-fox<|im_end|>", "fox-red<|im_end|>"]
    assert [scored(tiny_tokenizer, p.rejected) for p in pairs] == ["fox red<|im_end|>", "no<|im_end|>"]
