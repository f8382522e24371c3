"""tokenize.py against independent references.

* token ids: transformers' own ``apply_chat_template(tokenize=True)``;
* label mask: transformers' ``return_assistant_tokens_mask`` with a ChatML
  template carrying ``{% generation %}`` tags (it marks content + <|im_end|>);
* for SmolLM2's real template (no generation tags, a default system prompt):
  the labelled tokens decode to hand-written strings.
"""
from __future__ import annotations

import copy

import pytest
from data_helpers import ALPACA, CHAT, SHAREGPT, trained_runs

from loraq.data.dataset import tokenize_samples
from loraq.data.formats import Sample, to_samples
from loraq.data.prompts import prompt_ids, stop_token_ids
from loraq.data.readers import Record
from loraq.data.tokenize import render_chat, tokenize_documents, tokenize_sample

GENERATION_TAGGED_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

MULTI_TURN = [{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": "Capital of France?"},
              {"role": "assistant", "content": "Paris"},
              {"role": "user", "content": "And of Italy? Say it twice."},
              {"role": "assistant", "content": "Rome Rome"}]


def chat(messages) -> Sample:
    return Sample("chat", "f.jsonl:1", messages=messages)


@pytest.fixture(scope="module")
def tagged_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = GENERATION_TAGGED_CHATML
    return tok


def reference(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("record", [CHAT, SHAREGPT, ALPACA, {"messages": MULTI_TURN}],
                         ids=["chat", "sharegpt", "alpaca", "multi-turn"])
def test_ids_and_mask_match_transformers_assistant_mask(tagged_tokenizer, record):
    _, [sample] = to_samples([Record(record, "f.jsonl:1")])
    example = tokenize_sample(sample, tagged_tokenizer)
    ids, mask = reference(tagged_tokenizer, sample.messages)
    assert example.input_ids == ids
    assert [int(label != -100) for label in example.labels] == mask


def test_smollm_template_multi_turn_with_system(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm_dir))
    example = tokenize_sample(chat(MULTI_TURN), tok)
    assert example.input_ids == list(tok.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=True)["input_ids"])
    assert trained_runs(tok, example.input_ids, example.labels) == ["Paris<|im_end|>", "Rome Rome<|im_end|>"]
    # no system turn: the template injects its default system prompt, which is not trained
    example = tokenize_sample(chat(MULTI_TURN[1:3]), tok)
    text = tok.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert trained_runs(tok, example.input_ids, example.labels) == ["Paris<|im_end|>"]
    # what a generator starts from is the prompt part, ending in the assistant header
    assert tok.decode(prompt_ids(tok, messages=MULTI_TURN[:4])) == tok.apply_chat_template(
        MULTI_TURN[:4], tokenize=False, add_generation_prompt=True)
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_train_on_inputs_trains_every_token(tiny_tokenizer):
    example = tokenize_sample(chat(MULTI_TURN), tiny_tokenizer, train_on_inputs=True)
    assert example.labels == example.input_ids
    assert tiny_tokenizer.decode(example.input_ids) == tiny_tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


def test_completion_is_plain_text_plus_trained_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    example = tokenize_sample(Sample("completion", "f:1", prompt="The sky is", completion=" blue."), tok)
    assert example.input_ids == tok("The sky is blue.")["input_ids"] + [tok.eos_token_id]
    assert trained_runs(tok, example.input_ids, example.labels) == [" blue.<|im_end|>"]


def test_tokenizer_without_template_gets_chatml(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat(tok, messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    example = tokenize_sample(chat(messages), tok)
    assert trained_runs(tok, example.input_ids, example.labels) == ["hello<|im_end|>"]


def test_trimming_template_and_a_separate_end_of_turn_token(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = GENERATION_TAGGED_CHATML.replace("message['content']", "(message['content'] | trim)")
    tok.eos_token = "<|endoftext|>"  # end of turn <|im_end|> is then not EOS: both must stop generation
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "  padded answer \n"}]
    example = tokenize_sample(chat(messages), tok)
    ids, mask = reference(tok, messages)
    assert example.input_ids == ids and [int(label != -100) for label in example.labels] == mask
    assert trained_runs(tok, example.input_ids, example.labels) == ["padded answer<|im_end|>"]
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]


def test_template_that_is_not_prefix_consistent(tiny_tokenizer):
    # the last assistant turn renders differently from the prompt + generation prompt before it
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for message in messages %}{% if loop.last %}{{ 'answer follows\\n' }}{% endif %}"
                         + GENERATION_TAGGED_CHATML[len("{% for message in messages %}"):])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]  # the answer is the question
    example = tokenize_sample(chat(messages), tok)
    ids, mask = reference(tok, messages)
    assert example.input_ids == ids and [int(label != -100) for label in example.labels] == mask


def test_template_without_end_of_turn_gets_a_trained_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    example = tokenize_sample(chat(messages), tok)
    assert example.input_ids == (list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
                                 + [tok.eos_token_id])
    # "assistant: hello" tokenizes as ... ":", " hello": the token straddling the answer's start is trained
    assert trained_runs(tok, example.input_ids, example.labels) == [" hello", "<|im_end|>"]


def test_truncation_and_dropping_are_counted(tiny_tokenizer):
    long_prompt = chat([{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}])
    short = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a long answer " * 5}])
    n_short = len(tokenize_sample(short, tiny_tokenizer))
    seq_len = n_short - 3
    examples, stats = tokenize_samples([long_prompt, short, short], tiny_tokenizer, seq_len)
    assert (stats.truncated, stats.dropped, stats.examples) == (3, 1, 2)  # the long prompt leaves no answer token
    assert all(len(e) == seq_len for e in examples)
    with pytest.raises(Exception) as info:
        tokenize_samples([long_prompt], tiny_tokenizer, 16, source="f.jsonl")
    assert "f.jsonl" in str(info.value) and "raise --seq-len" in str(info.value)


def test_text_documents_are_joined_with_eos_and_chunked(tiny_tokenizer):
    tok = tiny_tokenizer
    docs = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]
    samples = [Sample("text", f"f.jsonl:{i}", text=t) for i, t in enumerate(docs, 1)]
    chunks = tokenize_documents(samples, tok, seq_len=8)
    stream = tok(docs[0])["input_ids"] + [tok.eos_token_id] + tok(docs[1])["input_ids"] + [tok.eos_token_id]
    assert [t for c in chunks for t in c.input_ids] == stream[:len(stream) - (len(stream) % 8 == 1)]
    assert all(len(c) == 8 for c in chunks[:-1]) and all(c.labels == c.input_ids for c in chunks)
