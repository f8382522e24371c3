"""Helpers shared by the quantization tests (imported as a plain module)."""
from __future__ import annotations

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (for bitwise equality); -0.0 counts as +0.0.

    bitsandbytes' own CPU paths disagree on the sign of FP4's zero code
    (index 8): its scalar kernel gives -0.0, its vector kernel, its PyTorch
    fallback and its stored table give +0.0. Adding +0.0 folds the two.
    """
    t = t.contiguous() + 0.0
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def bnb_cpu_dequant_is_right(shape, blocksize: int) -> bool:
    """Whether bitsandbytes 0.50's CPU ``dequantize_4bit`` kernel is correct for this shape.

    Its AVX-512 path (rows of a multiple of 16 columns, blocksize < 2048)
    indexes the scales per row, so it reads the wrong absmax whenever a block
    straddles two rows. Elsewhere the tests compare against float64 math instead.
    """
    rows = 1 if len(shape) < 2 else int(torch.Size(shape[:-1]).numel())
    cols = shape[-1]
    return rows == 1 or cols % 16 != 0 or cols % blocksize == 0 or blocksize >= 2048


def tiny_llama(vocab_size: int = 300, seed: int = 0, **overrides):
    """A random 2-layer Llama (hidden 64) in float32, eval mode; ``overrides`` go to LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()
