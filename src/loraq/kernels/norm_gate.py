"""Leaner autograd for two elementwise blocks of decoder models: RMSNorm and the gated MLP activation.

* RMSNorm: ``xhat = x * r`` with ``r = (mean(x^2) + eps)^(-1/2)``, computed in
  float32, in one of the three forms the families use:

  - ``cast_then_scale``:  ``y = w * cast(xhat)``          (Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite)
  - ``scale_then_cast``:  ``y = cast(w * xhat)``          (OLMo2)
  - ``offset_scale``:     ``y = cast(xhat * (1 + w))``    (Gemma2, Gemma3; ``w`` starts at zero)

  Autograd keeps the float32 copy of ``x`` (twice the bytes of a bf16 input);
  :class:`RMSNormFunction` keeps ``x`` as given and ``r`` [.., 1], and its
  backward is the closed form, in float32, with ``v`` the effective scale
  (``w``, or ``1 + w`` for ``offset_scale``)::

      g = dy * v       dx = r * (g - xhat * mean(g * xhat))       dw = sum(dy * xhat)

  (``cast(xhat)`` in ``dw`` for ``cast_then_scale``, as its forward multiplies it).

* The gated MLP activation, ``h = act(a) * b`` with ``act`` SiLU (Llama & co.)
  or the tanh approximation of GeLU (Gemma). Autograd keeps ``a``, ``act(a)``
  and ``b``; :class:`GatedActFunction` keeps ``a`` and ``b`` and recomputes in
  backward, with ``sigma`` the logistic function and, for GeLU-tanh,
  ``u = k (a + c a^3)``, ``k = sqrt(2 / pi)``, ``c = 0.044715``, ``t = tanh(u)``::

      silu:       db = dh * a sigma(a)              da = dh * b * sigma(a) * (1 + a (1 - sigma(a)))
      gelu_tanh:  db = dh * a (1 + t) / 2           da = dh * b * ((1 + t) / 2 + a (1 - t^2) k (1 + 3 c a^2) / 2)

The forwards run the very same operations as transformers' modules, so
outputs are bit-identical; the backwards are the float32 formulas (tests hold
them to float64). Which modules of which families take them:
:mod:`loraq.kernels.families`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RMSNORM_FORMS = ("cast_then_scale", "scale_then_cast", "offset_scale")
GATE_ACTIVATIONS = ("silu", "gelu_tanh")
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _rmsnorm_grad_x(x, r, dy, scale):
    xhat = x.to(torch.float32) * r
    g = dy.to(torch.float32) * scale.to(torch.float32)
    return ((g - xhat * (g * xhat).mean(-1, keepdim=True)) * r).to(x.dtype)


def _silu_mul_grads(a, b, dh):
    af = a.to(torch.float32)
    sig = torch.sigmoid(af)
    dhf = dh.to(torch.float32)
    return (dhf * b.to(torch.float32) * sig * (1.0 + af * (1.0 - sig))).to(a.dtype), (dhf * af * sig).to(b.dtype)


def _gelu_tanh_mul_grads(a, b, dh):
    af = a.to(torch.float32)
    t = torch.tanh(_GELU_K * (af + _GELU_C * af * af * af))
    dhf = dh.to(torch.float32)
    half = 0.5 * (1.0 + t)
    slope = half + 0.5 * af * (1.0 - t * t) * _GELU_K * (1.0 + 3.0 * _GELU_C * af * af)
    return (dhf * b.to(torch.float32) * slope).to(a.dtype), (dhf * af * half).to(b.dtype)


_KERNELS = {"rms": _rmsnorm_grad_x, "silu": _silu_mul_grads, "gelu_tanh": _gelu_tanh_mul_grads}


def _kernel(name: str):
    """The elementwise backward as one generated loop (Inductor), else the eager function."""
    from loraq.kernels.compile import compiled

    return compiled(name, _KERNELS[name])


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, form: str = "cast_then_scale"):
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if form == "cast_then_scale":
            y = weight * (xf * r).to(x.dtype)
        elif form == "scale_then_cast":
            y = (weight * (xf * r)).to(x.dtype)
        else:  # offset_scale
            y = (xf * r * (1.0 + weight.float())).to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        ctx.form = form
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        scale = 1.0 + weight.float() if ctx.form == "offset_scale" else weight
        dx = _kernel("rms")(x, r, dy, scale)
        dw = None
        if ctx.needs_input_grad[1]:
            xhat = x.to(torch.float32) * r
            if ctx.form == "cast_then_scale":
                terms = dy * xhat.to(x.dtype)
            else:
                terms = dy.to(torch.float32) * xhat
            dw = terms.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, None, None


class GatedActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, activation: str = "silu"):
        ctx.save_for_backward(a, b)
        ctx.activation = activation
        return (F.silu(a) if activation == "silu" else F.gelu(a, approximate="tanh")) * b

    @staticmethod
    def backward(ctx, dh):
        a, b = ctx.saved_tensors
        da, db = _kernel(ctx.activation)(a, b, dh)
        return da, db, None


def reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, form: str) -> torch.Tensor:
    """The definition in float64 (no casts): what the backward is tested against."""
    x64, w64 = x.double(), weight.double()
    xhat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return xhat * (1.0 + w64) if form == "offset_scale" else xhat * w64


def reference_gated(a: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
    a64 = a.double()
    act = F.silu(a64) if activation == "silu" else F.gelu(a64, approximate="tanh")
    return act * b.double()
