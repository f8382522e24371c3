"""Attention for short training sequences on the CPU, as a few large matrix products.

For queries ``Q`` [B, H, T, d], keys/values ``K, V`` [B, Hkv, T, d] (``H = G * Hkv``
grouped-query heads share a key/value head) and a mask ``M`` (causal, or any
boolean [B, 1, T, T] such as the block-diagonal mask of packed examples)::

    S = scale * Q K^T (float32)        P = softmax(S + log M)        O = P V

and the gradients, with ``dO`` given::

    dV = P^T dO        dP = dO V^T        dS = P * (dP - rowsum(dP * P))
    dQ = scale * dS K  dK = scale * dS^T Q

The G query heads of a group are stacked along the rows (a free view), so each
key/value head is multiplied once -- no ``repeat_kv`` copies -- and forward
saves only P (in the compute dtype). PyTorch's CPU flash kernel walks the
same T x T work in small tiles; for T up to ~1k the plain products run at
matmul speed and win (``bench/NOTES.md``). Longer sequences, dropout, or
other devices go to ``scaled_dot_product_attention`` unchanged.
:func:`reference_attention` is the definition the tests hold this to.
"""
from __future__ import annotations

import math

import torch

MAX_SAVED_BYTES = 32 << 20  # P saved for backward, per layer; past this the memory-lean SDPA kernel is better


def reference_attention(q, k, v, mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """O = softmax(scale Q K^T + log M) V in float64, repeating K/V over the groups."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).double()
    v = v.repeat_interleave(groups, dim=1).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    allowed = _allowed(mask, causal, q.shape[-2], q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v).to(q.dtype)


def _allowed(mask: torch.Tensor | None, causal: bool, t: int, device) -> torch.Tensor | None:
    if mask is not None:
        return mask if mask.dtype == torch.bool else mask == 0
    if causal:
        return torch.ones(t, t, dtype=torch.bool, device=device).tril_()
    return None


class GroupedAttention(torch.autograd.Function):
    """Forward and backward of the module docstring, in the compute dtype (softmax accumulates in fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale: float):
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        # the scale goes on Q (exact for the usual d = 64, 128: a power of two)
        qs = (q * scale).reshape(b, hkv, g * t, d)  # heads kv*g .. kv*g+g-1 stacked along rows
        s = torch.matmul(qs, k.transpose(-1, -2))  # [b, hkv, g*t, t]
        if allowed is not None:  # [t, t] or [b or 1, t, t]
            s.view(b, hkv, g, t, t).masked_fill_(~allowed.reshape(-1, 1, 1, t, t), float("-inf"))
        p = torch.softmax(s, dim=-1)  # one kernel, fp32 inside
        del s
        out = torch.matmul(p, v)  # [b, hkv, g*t, d]
        ctx.save_for_backward(qs, k, v, p)
        ctx.scale = scale
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v, p = ctx.saved_tensors
        b, hkv, gt, d = qs.shape
        do = grad_out.reshape(b, hkv, gt, d)
        dv = torch.matmul(p.transpose(-1, -2), do)  # sums over the group's rows: the GQA reduction for free
        dp = torch.matmul(do, v.transpose(-1, -2))
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # P * (dP - rowsum(dP * P))
        del dp
        dq = torch.matmul(ds, k).mul_(ctx.scale).view(b, hkv * (gt // grad_out.shape[2]), grad_out.shape[2], d)
        dk = torch.matmul(ds.transpose(-1, -2), qs)
        return dq, dk, dv, None, None


def fast_path_applies(q: torch.Tensor, k: torch.Tensor, dropout: float) -> bool:
    """Training on the CPU (grad enabled: never generation, whose left padding masks whole rows), short T."""
    b, h, t, _ = q.shape
    return (q.device.type == "cpu" and torch.is_grad_enabled() and dropout == 0.0 and k.shape[-2] == t and t > 1
            and h % k.shape[1] == 0 and b * h * t * t * q.element_size() <= MAX_SAVED_BYTES)


def loraq_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """A transformers attention function (``AttentionInterface``): the fast path or SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or not fast_path_applies(query, key, dropout)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    allowed = _allowed(attention_mask, causal, query.shape[-2], query.device)
    if allowed is not None and allowed.dim() == 4:
        allowed = allowed[:, 0] if allowed.shape[1] == 1 else None
        if allowed is None:  # a per-head mask: not this path's shape
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
    out = GroupedAttention.apply(query, key, value, allowed, scale)
    return out.transpose(1, 2).contiguous(), None


NAME = "loraq_sdpa"


def register() -> str:
    """Make ``attn_implementation="loraq_sdpa"`` known to transformers (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, loraq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
