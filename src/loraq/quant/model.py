"""Quantize a whole model in place: every nn.Linear (and transformers Conv1D) but the output head becomes a Linear4bit.

Embeddings, norms and the output head stay in full precision, as in QLoRA
(and as transformers + bitsandbytes do it). A ``Conv1D`` weight is quantized
transposed, as ``[out, in]``, exactly as transformers + bitsandbytes do it.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loraq.modules import is_dense_linear, output_head_name
from loraq.quant.functional import check_settings
from loraq.quant.linear import Linear4bit


def quantizable_layer_names(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Names of the plain nn.Linear and Conv1D modules that are not the output head, nor in (or under) ``skip``."""
    skipped = set(skip)
    head = output_head_name(model)
    if head is not None:
        skipped.add(head)

    def is_skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in skipped)

    # exactly nn.Linear (not subclasses) and Conv1D: the layers transformers + bitsandbytes would convert
    return [name for name, module in model.named_modules() if is_dense_linear(module) and not is_skipped(name)]


def quantize_model_(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                    compute_dtype: torch.dtype | str = torch.bfloat16, skip: Iterable[str] | None = None) -> list[str]:
    """Replace every nn.Linear / Conv1D except the output head (and ``skip``) with a Linear4bit; returns their names.

    Each weight is quantized as it is stored (its own dtype), and the
    full-precision layer is dropped right after, so peak memory grows by one
    layer's temporaries, not by a second model.
    """
    check_settings(blocksize, quant_type)
    names = quantizable_layer_names(model, skip or ())
    for name in names:
        linear = model.get_submodule(name)
        layer = Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                                       compute_dtype=compute_dtype, name=name)
        model.set_submodule(name, layer)
    return names
