"""Leaner autograd for two elementwise blocks of Llama-style decoders.

* RMSNorm, ``y = w * cast(x * r)`` with ``r = (mean(x^2) + eps)^(-1/2)`` computed
  in float32. Autograd keeps the float32 copy of ``x`` (twice the bytes of a
  bf16 input); :class:`RMSNormFunction` keeps ``x`` as given and ``r`` [.., 1],
  and its backward is the closed form, in float32::

      g = dy * w       dx = r * (g - xhat * mean(g * xhat))       dw = sum(dy * cast(xhat))

* The gated MLP activation, ``h = silu(a) * b``. Autograd keeps ``a``,
  ``silu(a)`` and ``b``; :class:`SiluMulFunction` keeps ``a`` and ``b`` and
  recomputes ``sigma(a)`` in backward::

      db = dh * silu(a)        da = dh * b * sigma(a) * (1 + a * (1 - sigma(a)))

The forwards run the very same operations as transformers' modules, so outputs
are bit-identical; the backwards are the float32 formulas (tests hold them to
float64). :func:`apply_norm_gate_modules` swaps them into the modules of known
architectures only (an allowlist of classes whose code is exactly this math).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
GATED_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


def _rmsnorm_grad_x(x, r, dy, weight):
    xhat = x.to(torch.float32) * r
    g = dy.to(torch.float32) * weight.to(torch.float32)
    return ((g - xhat * (g * xhat).mean(-1, keepdim=True)) * r).to(x.dtype)


def _silu_mul_grads(a, b, dh):
    af = a.to(torch.float32)
    sig = torch.sigmoid(af)
    dhf = dh.to(torch.float32)
    return (dhf * b.to(torch.float32) * sig * (1.0 + af * (1.0 - sig))).to(a.dtype), (dhf * af * sig).to(b.dtype)


_KERNELS = {"rms": _rmsnorm_grad_x, "silu": _silu_mul_grads}


def _kernel(name: str):
    """The elementwise backward as one generated loop (Inductor), else the eager function."""
    from loraq.kernels.compile import compiled

    return compiled(name, _KERNELS[name])


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * r).to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        dx = _kernel("rms")(x, r, dy, weight)
        dw = None
        if ctx.needs_input_grad[1]:
            xhat = x.to(torch.float32) * r
            dw = (dy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, None


class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dh):
        a, b = ctx.saved_tensors
        da, db = _kernel("silu")(a, b, dh)
        return da, db


def _rmsnorm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _gated_mlp_forward(self, x):
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def apply_norm_gate_modules(model: nn.Module) -> int:
    """Swap in the lean forwards on allowlisted modules (SiLU-gated MLPs only); returns how many."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name in RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            count += 1
        elif name in GATED_MLP_CLASSES and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish"):
            module.forward = types.MethodType(_gated_mlp_forward, module)
            count += 1
    return count
