"""load_model for lora/full: transformers' own model in the compute dtype, tokenizer and chat template alongside."""
from __future__ import annotations

import pytest
import torch
from models_testlib import logits

from loraq.models.load import load_model, load_tokenizer


@pytest.mark.parametrize("method", ["lora", "full"])
def test_full_precision_matches_transformers(tiny_llama_dir, tiny_reference, probe_ids, method):
    loaded = load_model(str(tiny_llama_dir), method=method, dtype="fp32", device="cpu")
    assert loaded.dtype == torch.float32 and loaded.method == method and loaded.quantized_modules == []
    assert not loaded.model.training
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))


def test_bf16_compute_dtype(tiny_llama_dir, tiny_reference):
    loaded = load_model(str(tiny_llama_dir), method="lora", dtype="bf16", device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    ref = tiny_reference.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16)
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, ref)


def test_tokenizer_and_chat_template_come_with_the_model(tiny_llama_dir, tiny_tokenizer):
    loaded = load_model(str(tiny_llama_dir), method="lora", dtype="fp32", device="cpu")
    messages = [{"role": "user", "content": "hello"}]
    for tok in (loaded.tokenizer, load_tokenizer(str(tiny_llama_dir))):
        assert tok.chat_template == tiny_tokenizer.chat_template
        assert (tok.apply_chat_template(messages, tokenize=False)
                == tiny_tokenizer.apply_chat_template(messages, tokenize=False))
        assert tok("The capital of France")["input_ids"] == tiny_tokenizer("The capital of France")["input_ids"]


def test_gguf_loads_like_the_model_it_was_written_from(loraq_cache, tiny_gguf, tiny_reference,
                                                       probe_ids, tiny_tokenizer):
    # the GGUF holds q/k permuted the llama.cpp way; transformers must undo it to match the original exactly
    loaded = load_model(str(tiny_gguf), method="lora", dtype="fp32", device="cpu")
    assert loaded.source.kind == "gguf"
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))
    text = "What is the capital of France?"
    assert loaded.tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert loaded.tokenizer.chat_template == tiny_tokenizer.chat_template
