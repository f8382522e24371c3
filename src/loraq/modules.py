"""Finding parts of a model that more than one layer of loraq needs: the output head, and linear layers
stored transposed (transformers' ``Conv1D``).

A model's output head is what ``get_output_embeddings()`` returns (its real
name differs by family: ``lm_head``, ``embed_out``, ``output``, ...), else a
top-level ``lm_head``. A wrapper that stands in for the head -- a module whose
``base`` or ``original_module`` is the head, as loraq's LoRA and
modules-to-save wrappers are -- carries the head's name.

transformers' ``Conv1D`` (GPT-2 and the families built on it) is a linear
layer whose weight is stored transposed: ``y = x W + b`` with ``W`` of shape
``[in, out]``, where ``nn.Linear`` computes ``x W^T + b`` with ``[out, in]``.
PEFT calls this layout ``fan_in_fan_out``. Everywhere loraq reasons about a
weight (4-bit quantization, LoRA's ``B A``, merging, DoRA's norms) it uses the
``[out, in]`` view, :func:`linear_weight`; only the stored tensor keeps the
Conv1D layout.
"""
from __future__ import annotations

import torch
from torch import nn


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            return head
    return getattr(model, "lm_head", None)


def output_head_name(model: nn.Module) -> str | None:
    """The module name of the output head (or of the wrapper around it), or None."""
    head = output_head(model)
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
        if getattr(module, "base", None) is head or getattr(module, "original_module", None) is head:
            return name
    return None


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class (None when transformers is not importable)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    kind = conv1d_type()
    return kind is not None and isinstance(module, kind)


def is_dense_linear(module: nn.Module) -> bool:
    """Exactly ``nn.Linear`` (not a subclass) or a ``Conv1D``: the layers transformers + bitsandbytes quantize."""
    return type(module) is nn.Linear or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear``-like layer or a ``Conv1D``."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a transposed view for a ``Conv1D``; no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def dense_layer(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, conv1d: bool = False) -> nn.Module:
    """A frozen ``nn.Linear`` -- or, with ``conv1d``, a ``Conv1D`` -- holding ``weight`` (given ``[out, in]``) and a
    copy of ``bias``, in ``dtype``."""
    out_features, in_features = weight.shape
    if conv1d:
        with torch.device("meta"):
            layer = conv1d_type()(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
        # Conv1D always adds its bias (torch.addmm): a layer without one gets zeros
        bias = torch.zeros(out_features, dtype=dtype, device=weight.device) if bias is None else bias.detach()
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return layer
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer
