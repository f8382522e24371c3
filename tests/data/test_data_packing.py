"""packing.py: a packed row computes exactly what its examples compute alone (tiny random Llama, fp32)."""
from __future__ import annotations

import pytest
import torch

from loraq.data.formats import Sample
from loraq.data.packing import collate, pack, padding_fraction
from loraq.data.tokenize import Example, tokenize_sample

PROMPTS = [("Capital of France?", "Paris."), ("2 + 2 =", "4"), ("Say hello to the lazy dog", "hello dog"),
           ("def add(a, b):", "return a + b"), ("Translate: cat", "chat"), ("Numbers 0 1 2", "3 4 5 6 7 8 9 10 42")]


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def examples(tiny_tokenizer) -> list[Example]:
    out = []
    for i, (user, answer) in enumerate(PROMPTS):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.append(tokenize_sample(Sample("chat", f"f:{i}", messages=messages), tiny_tokenizer,
                                   train_on_inputs=i % 2 == 1))
    return out


def alone(model, example: Example):
    """Logits and summed loss of one example run by itself: the reference."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, labels=torch.tensor([example.labels]), use_cache=False)
    n = example.num_trained
    return out.logits[0], out.loss * n, n


def test_packed_rows_equal_examples_run_alone(model, examples, tiny_tokenizer):
    rows = pack(examples, seq_len=max(len(e) for e in examples) * 2)
    assert any(len(row) > 1 for row in rows)
    batch = collate(rows, tiny_tokenizer.pad_token_id, packed=True)
    assert batch.attention_mask is None
    with torch.no_grad():
        out = model(**batch.model_inputs())
    loss_sum, n_total = 0.0, 0
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            logits, loss, n = alone(model, example)
            torch.testing.assert_close(out.logits[r, at:at + len(example)], logits, atol=1e-5, rtol=0)
            loss_sum, n_total = loss_sum + loss, n_total + n
            at += len(example)
    assert batch.num_trained_tokens == n_total
    torch.testing.assert_close(out.loss, loss_sum / n_total, atol=1e-5, rtol=0)


def test_positions_that_do_not_restart_would_leak(model, examples, tiny_tokenizer):
    # the control: the same packed row with plain 0..T-1 positions attends across examples
    rows = [tuple(examples[:2])]
    batch = collate(rows, tiny_tokenizer.pad_token_id, packed=True)
    with torch.no_grad():
        leaky = model(input_ids=batch.input_ids, use_cache=False).logits
    second, _, _ = alone(model, examples[1])
    assert (leaky[0, len(examples[0]):] - second).abs().max() > 1e-3


def test_unpacked_batch_is_right_padded_and_equals_runs_alone(model, examples, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    batch = collate([(e,) for e in examples], pad, packed=False)
    width = max(len(e) for e in examples)
    assert batch.input_ids.shape == (len(examples), width)
    for r, example in enumerate(examples):
        n = len(example)
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (width - n)
        assert batch.input_ids[r, n:].eq(pad).all() and batch.labels[r, n:].eq(-100).all()
    with torch.no_grad():
        out = model(**batch.model_inputs())
    sums = [alone(model, e) for e in examples]
    for r, example in enumerate(examples):
        torch.testing.assert_close(out.logits[r, :len(example)], sums[r][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, sum(s[1] for s in sums) / sum(s[2] for s in sums), atol=1e-5, rtol=0)


def test_best_fit_decreasing_by_hand():
    lengths = [5, 4, 3, 3, 2, 1]
    examples = [Example(list(range(n)), list(range(n)), f"e{i}") for i, n in enumerate(lengths)]
    rows = pack(examples, seq_len=8)
    # 5 opens row A (room 3); 4 opens B (room 4); 3 fits A exactly; 3 -> B (room 1); 2 opens C; 1 -> B
    assert [[e.where for e in row] for row in rows] == [["e0", "e2"], ["e1", "e3", "e5"], ["e4"]]


def test_padding_fraction_by_hand():
    def row(*sizes):
        return tuple(Example([0] * n, [0] * n) for n in sizes)

    # batch 1: rows of 4 and 2 -> 8 slots, 6 tokens; batch 2: one row of 3 -> 3 slots, 3 tokens
    assert padding_fraction([[row(4), row(2)], [row(1, 2)]]) == pytest.approx(1 - 9 / 11)
