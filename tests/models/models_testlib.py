"""Helpers for the models/ tests (a module of its own: `conftest` is not importable by name reliably)."""
from __future__ import annotations

import torch


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def assert_one_line(exc: BaseException, *needles: str) -> None:
    """The error is one non-empty line containing every needle."""
    text = str(exc)
    assert "\n" not in text and text.strip() == text and text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def small_llama(vocab_size: int, seed: int = 0, **overrides):
    """A random 2-layer Llama with any config overrides (untied head, biases, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()
