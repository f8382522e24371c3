"""Tiny random models of each supported family, saved as HF folders with the shared tiny tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str, vocab_size: int, **overrides):
    """A transformers config of ``family`` small enough for a test (random weights, the tiny vocabulary)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "phi3": Phi3Config}
    kw = dict(SMALL, vocab_size=vocab_size, tie_word_embeddings=False)
    if family == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    return classes[family](**kw)


def tiny_model(family: str, vocab_size: int, seed: int = 0, init_std: float = 0.02, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size, initializer_range=init_std, **overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny(model, tokenizer, folder: Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def token_ids(tokenizer, n_rows: int = 2) -> torch.Tensor:
    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris. 42"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:n_rows]]
    length = min(len(r) for r in rows)
    return torch.tensor([r[:length] for r in rows])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def gguf_model(path: Path):
    """The GGUF file as transformers' own GGUF reader loads it (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
