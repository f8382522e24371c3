"""A frozen 4-bit linear layer: ``y = x W^T + b`` with ``W`` stored as NF4/FP4.

``W`` lives only as packed bytes plus its QuantState (see
:mod:`loraq.quant.functional`). Each forward dequantizes it on the fly into
the compute dtype; backward dequantizes it again to return the input
gradient ``dL/dx = dL/dy W`` (both into one reused buffer on the CPU,
:mod:`loraq.quant.scratch`). Nothing but the packed bytes is saved for
backward, so between forward and backward the layer costs its packed data
and stats only (``numel / 2`` bytes plus about 1/64 of that for the scales).
The weight gets no gradient; the bias gets one only if it requires grad.

Inputs of any leading shape ``[..., in_features]``; computation in
``compute_dtype``; the output comes back in the input's dtype.
Decoding (at most ``SMALL_BATCH_ROWS`` rows on the CPU, and no autograd graph
being recorded: grad mode off, or an eval-mode layer whose input and bias need
no gradient) goes through :func:`~loraq.quant.functional.matmul_4bit`, which
may read the packed codes directly instead of dequantizing (equal within
float32 rounding); training always takes the autograd function.
A layer quantized from a transformers ``Conv1D`` (weight stored ``[in, out]``)
holds its weight as ``[out, in]``, as transformers + bitsandbytes quantize it
(the stored weight transposed first), and remembers ``conv1d=True`` so that a
dense rebuild (merging, dequantizing) returns to the Conv1D layout.
The state dict uses bitsandbytes' keys (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4|fp4``, ``bias``).
"""
from __future__ import annotations

import torch
from torch import nn

from loraq.devices import resolve_dtype
from loraq.modules import is_conv1d, linear_weight
from loraq.quant.functional import (
    SMALL_BATCH_ROWS,
    QuantState,
    dequantize_4bit,
    dequantize_4bit_rows,
    dequantize_for_product,
    matmul_4bit,
    quantize_4bit,
)
from loraq.quant.state_io import state_from_tensors, state_to_tensors


class _Linear4bitFunction(torch.autograd.Function):
    """``F.linear(x, dequantize(packed), bias)`` whose backward re-dequantizes instead of saving ``W``."""

    @staticmethod
    def forward(ctx, x, packed, state: QuantState, bias):
        ctx.state = state
        ctx.save_for_backward(packed)  # the uint8 parameter itself, not a copy
        weight = dequantize_for_product(packed, state, x.dtype)  # a reused buffer (quant/scratch.py): not saved
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_for_product(packed, ctx.state, grad_out.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Linear4bit(nn.Module):
    """Frozen 4-bit weight (``weight``: uint8 Parameter, ``quant_state``), optional ``bias``, ``compute_dtype``."""

    def __init__(self, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | str = torch.bfloat16, conv1d: bool = False):
        super().__init__()
        if len(quant_state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {list(quant_state.shape)}")
        self.out_features, self.in_features = quant_state.shape
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.compute_dtype = resolve_dtype(compute_dtype)
        self.conv1d = conv1d  # quantized from a Conv1D: dense rebuilds go back to that layout

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                    compute_dtype: torch.dtype | str = torch.bfloat16, name: str = "weight") -> Linear4bit:
        """Quantize the ``[out, in]`` weight of an ``nn.Linear`` or ``Conv1D`` as given (its own dtype); the bias
        is kept as is. ``name`` labels errors."""
        weight = linear_weight(linear).detach()
        packed, state = quantize_4bit(weight, blocksize, quant_type, double_quant, name=name)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, state, bias, compute_dtype, conv1d=is_conv1d(linear))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out_features, in_features]``, in ``dtype`` (default: the original weight's dtype)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None,
                        absmax: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the weight (see :func:`loraq.quant.functional.dequantize_4bit_rows`)."""
        return dequantize_4bit_rows(self.weight, self.quant_state, start, stop, dtype, absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if self._decoding(x):
            return matmul_4bit(x.to(self.compute_dtype), self.weight, self.quant_state, bias).to(x.dtype)
        out = _Linear4bitFunction.apply(x.to(self.compute_dtype), self.weight, self.quant_state, bias)
        return out.to(x.dtype)

    def _decoding(self, x: torch.Tensor) -> bool:
        """A few CPU rows and no graph to record: grad mode off, or an eval-mode layer whose input and bias want
        no gradient (a training-mode layer keeps the autograd function even for a frozen input, bit for bit)."""
        if x.device.type != "cpu" or x.numel() > SMALL_BATCH_ROWS * max(self.in_features, 1):
            return False
        if not torch.is_grad_enabled():
            return True
        return not (self.training or x.requires_grad or (self.bias is not None and self.bias.requires_grad))

    def _apply(self, fn, recurse=True):
        # a dtype cast must never reach the packed codes or the stats: move the state to wherever the weight went
        super()._apply(fn, recurse)
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order: weight, bias, then the quant state
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for suffix, tensor in state_to_tensors(self.quant_state).items():
            destination[f"{prefix}weight.{suffix}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        tensors = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        try:
            state = state_from_tensors(state_dict[key], tensors, key)
        except ValueError as exc:
            error_msgs.append(str(exc))
            return
        device = self.weight.device if self.weight.device.type != "meta" else state_dict[key].device
        self.weight = nn.Parameter(state_dict[key].detach().to(device).reshape(-1, 1), requires_grad=False)
        self.quant_state = state.to(device)
        self.out_features, self.in_features = state.shape
        bias_key = prefix + "bias"
        if self.bias is not None and bias_key in state_dict:
            self.bias = nn.Parameter(state_dict[bias_key].detach().to(device), requires_grad=False)
        elif self.bias is not None:
            missing_keys.append(bias_key)
        elif bias_key in state_dict:
            unexpected_keys.append(bias_key)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={s.quant_type}, double_quant={s.double_quant}, blocksize={s.blocksize}, "
                f"compute_dtype={self.compute_dtype}" + (", conv1d=True" if self.conv1d else ""))
