"""dataset.py: validation splits, references, stats and the demo default, through build_data."""
from __future__ import annotations

import pytest
from data_helpers import COMPLETION, TEXT, one_line_error, write_jsonl

from loraq.config import TrainConfig
from loraq.data.dataset import build_data


def chat_record(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "Reply with the number."},
                         {"role": "user", "content": f"number {i}"}, {"role": "assistant", "content": f"{i}"}]}


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict(kw)


def answers(bundle) -> list[str]:
    return [r.answer for r in bundle.references]


def test_val_fraction_is_a_deterministic_disjoint_split(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat_record(i) for i in range(40)])
    a = build_data(cfg(data=str(path), val_fraction=0.25, seed=1, eval_samples=100), tiny_tokenizer)
    b = build_data(cfg(data=str(path), val_fraction=0.25, seed=1, eval_samples=100), tiny_tokenizer)
    c = build_data(cfg(data=str(path), val_fraction=0.25, seed=2, eval_samples=100), tiny_tokenizer)
    assert (a.stats.train.examples, a.stats.val.examples) == (30, 10)
    assert answers(a) == answers(b) != answers(c)
    # references come from the held-out records, in file order; none of them is trained on
    held = [int(x) for x in answers(a)]
    assert held == sorted(held)
    train_answers = {tiny_tokenizer.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100])
                     for e in a.train_examples}
    assert {f"{i}<|im_end|>" for i in held}.isdisjoint(train_answers)
    assert len(train_answers) == 30


def test_references_are_prompts_rendered_by_the_template(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [chat_record(i) for i in range(5)])
    val = write_jsonl(tmp_path / "v.jsonl", [chat_record(i) for i in range(100, 104)])
    bundle = build_data(cfg(data=str(train), val_data=str(val), eval_samples=3), tiny_tokenizer)
    assert answers(bundle) == ["100", "101", "102"]
    ref = bundle.references[0]
    expected = tiny_tokenizer.apply_chat_template(chat_record(100)["messages"][:2], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ref.prompt_ids == list(expected) and ref.where == f"{val}:1"
    assert bundle.stats.val.examples == 4 and len(bundle.val) == 4


def test_completion_references_and_text_has_none(tmp_path, tiny_tokenizer):
    comp = write_jsonl(tmp_path / "c.jsonl", [COMPLETION] * 3)
    bundle = build_data(cfg(data=str(comp)), tiny_tokenizer)
    assert bundle.references[0].prompt_ids == tiny_tokenizer("The sky is")["input_ids"]
    assert bundle.references[0].answer == " blue."
    text = write_jsonl(tmp_path / "x.jsonl", [TEXT] * 10)
    bundle = build_data(cfg(data=str(text), seq_len=16), tiny_tokenizer)
    assert bundle.format == "text" and bundle.references == []
    per_doc = len(tiny_tokenizer(TEXT["text"])["input_ids"]) + 1
    assert bundle.stats.train.tokens == 10 * per_doc and max(len(e) for e in bundle.train_examples) == 16


def test_packing_keeps_every_example_and_fits_seq_len(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat_record(i) for i in range(30)])
    bundle = build_data(cfg(data=str(path), packing=True, seq_len=128), tiny_tokenizer)
    assert sum(len(row) for row in bundle.train) == 30 < 30 * len(bundle.train)
    assert all(sum(len(e) for e in row) <= 128 for row in bundle.train)
    batch = next(bundle.train_batches(global_batch_size=2, seed=0))
    assert batch.attention_mask is None and batch.num_examples > 2


def test_truncation_stats_and_all_dropped(tmp_path, tiny_tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [chat_record(1), long, long])
    bundle = build_data(cfg(data=str(path), seq_len=48), tiny_tokenizer)
    assert (bundle.stats.train.truncated, bundle.stats.train.dropped, bundle.stats.train.examples) == (2, 2, 1)
    only_long = write_jsonl(tmp_path / "l.jsonl", [long])
    one_line_error(lambda: build_data(cfg(data=str(only_long), seq_len=48), tiny_tokenizer), str(only_long),
                   "raise --seq-len")


def test_bad_records_skipped_when_asked(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{broken\n'
                    '{"messages": [{"role": "wizard", "content": "a"}]}\n', encoding="utf-8")
    one_line_error(lambda: build_data(cfg(data=str(path)), tiny_tokenizer), f"{path}:2")
    bundle = build_data(cfg(data=str(path)), tiny_tokenizer, skip_bad=True)
    assert bundle.stats.train.examples == 1 and bundle.stats.skipped == 2


def test_validation_file_of_another_kind_is_refused(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [chat_record(1)])
    val = write_jsonl(tmp_path / "v.jsonl", [TEXT])
    one_line_error(lambda: build_data(cfg(data=str(train), val_data=str(val)), tiny_tokenizer), str(val), "same kind")


def test_too_few_records_to_hold_out(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat_record(1)])
    one_line_error(lambda: build_data(cfg(data=str(path), val_fraction=0.5), tiny_tokenizer), "too few", "--val-data")


@pytest.mark.parametrize("packing", [False, True])
def test_no_data_means_the_demo_with_its_eval_split(tiny_tokenizer, packing):
    bundle = build_data(cfg(eval_samples=50, packing=packing, seq_len=256), tiny_tokenizer)
    assert bundle.format == "chat" and bundle.stats.train.records == 2000 and bundle.stats.val.records == 100
    assert bundle.stats.val_path.endswith("eval.jsonl") and len(bundle.references) == 50
    assert bundle.max_answer_tokens >= max(len(tiny_tokenizer(a)["input_ids"]) for a in answers(bundle))
