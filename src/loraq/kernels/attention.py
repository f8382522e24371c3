"""Attention for short training sequences on the CPU, as a few large matrix products.

For queries ``Q`` [B, H, T, d], keys/values ``K, V`` [B, Hkv, T, d] (``H = G * Hkv``
grouped-query heads share a key/value head) and a mask ``M`` (causal, or any
boolean [B, 1, T, T] such as the block-diagonal mask of packed examples)::

    S = scale * Q K^T (float32)        P = softmax(S + log M)        O = P V

and the gradients, with ``dO`` given::

    dV = P^T dO        dP = dO V^T        dS = P * (dP - rowsum(dP * P))
    dQ = scale * dS K  dK = scale * dS^T Q

The G query heads of a group are stacked along the rows (time-major, copied
once together with the scale), so each key/value head is multiplied once --
no ``repeat_kv`` copies -- and forward saves only P (in the compute dtype).
Under a causal mask the rows go in blocks of ``BLOCK`` query times, each
against the keys up to its last time only: the masked upper triangle is
mostly never computed (:func:`causal_blocks`). PyTorch's CPU flash kernel walks the
same T x T work in small tiles; for T up to ~1k the plain products run at
matmul speed and win (``bench/NOTES.md``). Longer sequences, dropout, or
other devices go to ``scaled_dot_product_attention`` unchanged.
:func:`reference_attention` is the definition the tests hold this to.
"""
from __future__ import annotations

import math

import torch

MAX_SAVED_BYTES = 32 << 20  # P saved for backward, per layer; past this the memory-lean SDPA kernel is better
BLOCK = 64  # query times per block of the causal skip (bench/NOTES.md)


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


def causal_blocks(t: int, allowed: torch.Tensor | None, causal: bool, block: int = BLOCK) -> list[tuple[int, int]]:
    """Query row ranges ``[start, end)``; each is multiplied with keys ``[0, end)`` only.

    Exact only when nothing above the diagonal is allowed (a causal model, and any mask that says so):
    then keys past a block's last query are masked for all of its rows and skipping them changes
    nothing. Otherwise one block spans everything.
    """
    if t <= block or not causal or (allowed is not None and _allows_future_keys(allowed)):
        return [(0, t)]
    n = -(-t // block)
    edges = [round(i * t / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _allows_future_keys(allowed: torch.Tensor) -> bool:
    """Whether a mask lets some query see a later key. A mask without values (the planner's storage-less probe,
    ``loraq.planning.probe``) is taken as the padding and packing masks training builds: it does not."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(allowed) or allowed.device.type == "meta":
        return False
    return bool(allowed.triu(1).any())


class GroupedAttention(torch.autograd.Function):
    """Forward and backward of the module docstring, in the compute dtype (softmax accumulates in fp32).

    Takes Q [B, H, T, d] and returns O as [B, T, H, d] (the layout the output projection reads).
    Rows are laid out time-major -- row ``t * G + j`` is query time t of the group's head j -- so a
    block of query times is a contiguous row range, and with a causal mask each block multiplies
    only the keys up to its end: with ``T / BLOCK`` blocks the products do ``(n + 1) / 2n`` of the
    full square's work (5/8 at T = 256).
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale: float, blocks):
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        # [b, hkv, t, g, d]: time-major rows; the scale goes on Q in the same pass (exact for d = 64, 128)
        qs = torch.empty(b, hkv, t, g, d, dtype=q.dtype, device=q.device)
        torch.mul(q.unflatten(1, (hkv, g)).transpose(2, 3), scale, out=qs)
        qs = qs.view(b, hkv, t * g, d)
        out = torch.empty(b, t, hkv, g, d, dtype=q.dtype, device=q.device)
        probs = []
        for t0, t1 in blocks:
            s = torch.matmul(qs[:, :, t0 * g:t1 * g], k[:, :, :t1].transpose(-1, -2))  # [b, hkv, (t1-t0)*g, t1]
            if allowed is not None:  # [t, t] or [b or 1, t, t]
                blk = allowed.reshape(-1, t, t)[:, t0:t1, :t1]
                s.view(b, hkv, t1 - t0, g, t1).masked_fill_(~blk.reshape(-1, 1, t1 - t0, 1, t1), float("-inf"))
            p = torch.softmax(s, dim=-1)  # one kernel, fp32 inside
            del s
            o = torch.matmul(p, v[:, :, :t1])  # [b, hkv, (t1-t0)*g, d]
            out[:, t0:t1].copy_(o.view(b, hkv, t1 - t0, g, d).transpose(1, 2))
            probs.append(p)
        ctx.save_for_backward(qs, k, v, *probs)
        ctx.scale, ctx.blocks = scale, blocks
        # under autocast (--method full: fp32 master weights, bf16 compute) the products above ran in bf16 while
        # Q, K and O may be fp32: the backward's products run under the same autocast (as torch.amp.custom_bwd)
        device = q.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out.view(b, t, h, d)

    @staticmethod
    def backward(ctx, grad_out):
        device, enabled, dtype = ctx.autocast
        if not enabled:
            return GroupedAttention._backward(ctx, grad_out)
        with torch.autocast(device, dtype=dtype):
            return GroupedAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        qs, k, v, *probs = ctx.saved_tensors
        b, hkv, tg, d = qs.shape
        t = k.shape[2]
        g = tg // t
        # dO in the rows' layout [b, hkv, t * g, d]
        do = grad_out.reshape(b, t, hkv, g, d).transpose(1, 2).reshape(b, hkv, tg, d)
        dq = torch.empty_like(qs)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for (t0, t1), p in zip(ctx.blocks, probs):
            rows = slice(t0 * g, t1 * g)
            do_b = do[:, :, rows]
            dv[:, :, :t1] += torch.matmul(p.transpose(-1, -2), do_b)  # sums over the group's rows: GQA for free
            dp = torch.matmul(do_b, v[:, :, :t1].transpose(-1, -2))
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # P * (dP - rowsum(dP * P))
            del dp
            dq[:, :, rows] = torch.matmul(ds, k[:, :, :t1])
            dk[:, :, :t1] += torch.matmul(ds.transpose(-1, -2), qs[:, :, rows])
        # back to Q's layout [b, h, t, d] (a strided view; the scale applied in place)
        dq = dq.mul_(ctx.scale).view(b, hkv, t, g, d).transpose(2, 3).reshape(b, hkv * g, t, d)
        return dq, dk, dv, None, None, None


def fast_path_applies(q: torch.Tensor, k: torch.Tensor, dropout: float) -> bool:
    """Training on the CPU (grad enabled: never generation, whose left padding masks whole rows), short T."""
    b, h, t, _ = q.shape
    return (q.device.type == "cpu" and torch.is_grad_enabled() and dropout == 0.0 and k.shape[-2] == t
            and h % k.shape[1] == 0 and fits_matmul_path(b, h, t, q.element_size()))


def fits_matmul_path(batch: int, heads: int, length: int, itemsize: int) -> bool:
    """The sizes the matmul path takes: more than one position, and the probabilities within MAX_SAVED_BYTES."""
    return length > 1 and batch * heads * length * length * itemsize <= MAX_SAVED_BYTES


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
    out = GroupedAttention.apply(query, key, value, allowed, scale, causal_blocks(query.shape[-2], allowed, causal))
    return out, None


NAME = "loraq_sdpa"


def register() -> str:
    """Make ``attn_implementation="loraq_sdpa"`` known to transformers (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, loraq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
