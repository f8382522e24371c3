"""One autograd node for a LoRA layer in training: the frozen product and the low-rank pair together.

For an input ``x`` [N, in] in the compute dtype, a frozen ``W0`` [out, in]
(dense, or 4-bit and dequantized on the fly), bias ``b0``, factors ``A``
[r, in] and ``B`` [out, r] (float32 masters, used rounded to the compute
dtype) and scale ``s``::

    h = x A^T                      y = x W0^T + b0 + s h B^T

and, for ``g = dL/dy``::

    gh = s g B          dL/dB = s g^T h          dL/dA = gh^T x
    dL/dx = g W0 + gh A (one product, accumulated in place)      dL/db0 = sum g

These are the products autograd runs for :meth:`LoraLinear.forward`'s
generic path, which stays the reference (a test holds the two equal); this
node saves the per-module Python and autograd work around them -- casting
nodes, the separate ``dL/dx`` add, a second node for the 4-bit base -- which
across SmolLM2's 210 LoRA layers is a few per cent of a training step
(``bench/NOTES.md``). The 4-bit weight is dequantized again in backward
instead of being saved, as in :class:`loraq.quant.linear.Linear4bit`, each
time into the same reused buffer (:mod:`loraq.quant.scratch`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, state, bias, a, b, scale: float):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        w = _dense(weight, state, dtype)
        a_c, b_c = a.to(dtype), b.to(dtype)
        h = x2 @ a_c.t()
        y = F.linear(x2, w, None if bias is None else bias.to(dtype))
        y.addmm_(h, b_c.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, h, a_c, b_c)
        ctx.state, ctx.scale, ctx.x_shape = state, scale, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, h, a_c, b_c = ctx.saved_tensors
        s = ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1])
        need_x, _, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        gh = (g @ b_c).mul_(s)  # [N, r]
        grad_a = (gh.t() @ x2).float() if need_a else None
        grad_b = (g.t() @ h).float().mul_(s) if need_b else None
        grad_x = None
        if need_x:
            grad_x = g @ _dense(weight, ctx.state, g.dtype)
            grad_x.addmm_(gh, a_c)
            grad_x = grad_x.view(ctx.x_shape)
        grad_bias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_bias else None
        return grad_x, None, None, grad_bias, grad_a, grad_b, None


def _dense(weight: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    if state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    from loraq.quant.functional import dequantize_for_product

    return dequantize_for_product(weight, state, dtype)  # one reused buffer: used by one product, never saved


def lora_linear(x, weight, state, bias, a, b, scale: float) -> torch.Tensor:
    """``x W0^T + b0 + s (x A^T) B^T`` as one autograd node; ``state`` is the 4-bit QuantState or None (dense)."""
    return LoraLinearFunction.apply(x, weight, state, bias, a, b, scale)
