"""encode.py (batched, offset-based masks) against the per-sample path and transformers' assistant masks.

The per-sample path (``tokenize_sample``: tokenize every prefix up to a span
boundary) and the batched one (one ``encode_batch`` call, offsets) are two
algorithms; on varied conversations, every template the tokenize tests use
and SmolLM2's real tokenizer they must give the same ids and labels.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from test_data_tokenize import GENERATION_TAGGED_CHATML, MULTI_TURN

from loraq.data.encode import FastEncoder, encode_samples, examples_of
from loraq.data.formats import Sample
from loraq.data.packing import pack, pack_lengths, padding_fraction, padding_fraction_of
from loraq.data.tokenize import Example, render_chat, tokenize_documents, tokenize_sample, truncate
from loraq.errors import DataError

WORDS = ("the quick brown fox jumps over lazy dog capital France Paris def add return 0 1 2 42 2024 user assistant "
         "answer question Translate hello bonjour merci chat é ü 東京 🙂").split()
SEPARATORS = [" ", " ", " ", "\n", "\n\n", "  ", "\t", ", ", ". "]


def varied_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
    text = "".join(w + rng.choice(SEPARATORS) for w in words)
    return rng.choice(["", " ", "\n"]) + text.rstrip() + rng.choice(["", "", " ", "\n", "\n\n"])


def varied_chats(n: int, seed: int = 0) -> list[Sample]:
    """Conversations with and without a system turn, 1-3 exchanges, leading/trailing whitespace, blank lines,
    non-ASCII text, and answers that repeat the question."""
    rng = random.Random(seed)
    samples = []
    for k in range(n):
        messages = [{"role": "system", "content": varied_text(rng)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            question = varied_text(rng)
            messages.append({"role": "user", "content": question})
            answer = question if rng.random() < 0.1 else varied_text(rng)
            messages.append({"role": "assistant", "content": answer})
        messages = [m for m in messages if m["content"].strip()] or [{"role": "user", "content": "hi"},
                                                                       {"role": "assistant", "content": "a"}]
        if messages[-1]["role"] != "assistant":
            messages.append({"role": "assistant", "content": "ok"})
        samples.append(Sample("chat", f"f.jsonl:{k + 1}", messages=messages))
    return samples


def reference(samples, tok, seq_len, train_on_inputs=False) -> list[Example]:
    return [truncate(tokenize_sample(s, tok, train_on_inputs), seq_len)[0] for s in samples]


def batched(samples, tok, seq_len, train_on_inputs=False) -> list[Example]:
    encoder = FastEncoder.of(tok)
    assert encoder is not None
    encoded = encode_samples(samples, tok, seq_len, train_on_inputs, encoder)
    examples = examples_of(encoded, [s.where for s in samples])
    assert encoded.num_trained.tolist() == [e.num_trained for e in examples]
    return examples


def same(a: list[Example], b: list[Example]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.input_ids, x.labels) == (y.input_ids, y.labels), x.where


TEMPLATES = {
    "chatml": None,
    "generation-tagged": GENERATION_TAGGED_CHATML,
    "trimming": GENERATION_TAGGED_CHATML.replace("message['content']", "(message['content'] | trim)"),
    "no-end-of-turn": ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"),
    "not-prefix-consistent": ("{% for message in messages %}{% if loop.last %}{{ 'answer follows\\n' }}{% endif %}"
                              + GENERATION_TAGGED_CHATML[len("{% for message in messages %}"):]),
}


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_batched_equals_per_sample_on_varied_chats(tiny_tokenizer, template, train_on_inputs):
    tok = copy.deepcopy(tiny_tokenizer)
    if TEMPLATES[template]:
        tok.chat_template = TEMPLATES[template]
    samples, refused = [], 0
    for sample in varied_chats(60, seed=list(TEMPLATES).index(template)):
        try:
            tokenize_sample(sample, tok)
            samples.append(sample)
        except DataError as exc:  # a conversation the template garbles: the batch refuses it with the same line
            with pytest.raises(DataError) as info:
                batched(samples[:1] + [sample], tok, 96, train_on_inputs)
            assert str(info.value) == str(exc)
            refused += 1
    assert len(samples) > 40
    same(batched(samples, tok, 96, train_on_inputs), reference(samples, tok, 96, train_on_inputs))


def test_offsets_that_a_post_processor_trims_give_the_same_masks(tiny_tokenizer):
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)  # as GPT-2's tokenizer.json has
    samples = varied_chats(60, seed=11)
    same(batched(samples, tok, 10_000), reference(samples, tok, 10_000))


def test_batched_masks_equal_transformers_assistant_masks(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = GENERATION_TAGGED_CHATML
    samples = varied_chats(40, seed=5)
    for example, sample in zip(batched(samples, tok, 10_000), samples):
        out = tok.apply_chat_template(sample.messages, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert example.input_ids == list(out["input_ids"])
        assert [int(label != -100) for label in example.labels] == list(out["assistant_masks"])


def test_batched_equals_per_sample_with_smollm2(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm_dir))
    samples = varied_chats(150, seed=1) + [Sample("chat", "m:1", messages=MULTI_TURN)]
    same(batched(samples, tok, 128), reference(samples, tok, 128))
    encoder = FastEncoder.of(tok)
    conversations = [s.messages for s in samples[:20]] + [s.messages[:2] for s in samples[:20]]
    for add in (False, True):  # the directly rendered template is apply_chat_template's text
        assert encoder.render(conversations, add) == [render_chat(tok, m, add) for m in conversations]
    # a header ending in a blank line: tokenizing the prompt alone ends it in one "\n\n" token where the full text
    # has "\n", "\n" (GPT-2's pre-tokenizer looks ahead), so the per-sample path would train those two newlines;
    # the offsets train what transformers' assistant mask marks
    tok.chat_template = GENERATION_TAGGED_CHATML.replace("'\n'}}{% if", "'\n\n'}}{% if").replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant\n\n'")
    samples = varied_chats(30, seed=7)
    for example, sample in zip(batched(samples, tok, 10_000), samples):
        out = tok.apply_chat_template(sample.messages, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert example.input_ids == list(out["input_ids"])
        assert [int(label != -100) for label in example.labels] == list(out["assistant_masks"])


def test_completions_and_text(tiny_tokenizer):
    rng = random.Random(3)
    samples = [Sample("completion", f"c:{i}", prompt=varied_text(rng), completion=varied_text(rng) or "x")
               for i in range(40)]
    same(batched(samples, tiny_tokenizer, 48), reference(samples, tiny_tokenizer, 48))
    docs = [Sample("text", f"t:{i}", text=varied_text(rng) or "x") for i in range(20)]
    encoded = encode_samples(docs, tiny_tokenizer, 16)
    chunks = tokenize_documents(docs, tiny_tokenizer, 16)  # the stream it cuts is the one stored
    stream = [t for c in chunks for t in c.input_ids]
    assert encoded.ids.tolist()[:len(stream)] == stream and encoded.trained.all()


def test_pack_lengths_makes_pack_s_rows_and_padding_fraction_of_agrees():
    rng = np.random.default_rng(0)
    for trial in range(20):
        seq_len = int(rng.integers(8, 300))
        lengths = np.minimum(rng.lognormal(np.log(seq_len / 4), 1.0, int(rng.integers(1, 800))).astype(int) + 1,
                             seq_len)
        examples = [Example([0] * int(n), [0] * int(n), str(i)) for i, n in enumerate(lengths)]
        rows = pack(examples, seq_len)
        row_starts, members = pack_lengths(lengths, seq_len)
        assert [[int(m) for m in members[row_starts[r]:row_starts[r + 1]]] for r in range(len(rows))] == \
            [[int(e.where) for e in row] for row in rows]
        order = list(range(len(rows)))
        random.Random(trial).shuffle(order)
        batch = int(rng.integers(1, 9))
        row_lengths = np.array([sum(len(e) for e in row) for row in rows])
        assert padding_fraction_of(row_lengths, order, batch) == padding_fraction(
            [[rows[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)])
