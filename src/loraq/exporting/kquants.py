"""Q4_K and Q6_K, ggml's "k-quant" blocks, quantized by loraq (the ``gguf`` package only dequantizes them).

Both work on super-blocks of 256 consecutive weights of a row (a row length
must be a multiple of 256).

Q4_K (144 bytes = 4.5 bits/weight): 8 sub-blocks of 32, each with a 6-bit
scale ``sc_j`` and a 6-bit min ``m_j``; a weight is ``d * sc_j * q - dmin *
m_j`` with ``q`` in 0..15 and ``d``, ``dmin`` the super-block's f16 scales.
Bytes: ``d`` (f16), ``dmin`` (f16), 12 bytes of scales and mins, 128 bytes of
codes. The 12 bytes hold ``sc_0..3 | (sc_4..7 >> 4) << 6``, ``m_0..3 | (m_4..7
>> 4) << 6``, ``(sc_4..7 & 15) | (m_4..7 & 15) << 4``; code byte ``32 k + l``
holds weight ``64 k + l`` in its low nibble and weight ``64 k + 32 + l`` in
its high nibble.

Q6_K (210 bytes = 6.5625 bits/weight): 16 sub-blocks of 16, each with a
signed 8-bit scale ``sc_j``; a weight is ``d * sc_j * (q - 32)`` with ``q`` in
0..63. Bytes: 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2 bits),
16 bytes scales, ``d`` (f16). For each half ``h`` of 128 weights (local index
``i``): ``ql[64h + l] = lo(q_l) | lo(q_{l+64}) << 4``, ``ql[64h + 32 + l] =
lo(q_{l+32}) | lo(q_{l+96}) << 4``, ``qh[32h + l] = hi(q_l) | hi(q_{l+32}) << 2
| hi(q_{l+64}) << 4 | hi(q_{l+96}) << 6`` (``l`` < 32).

How the numbers are chosen (loraq's own fit; any choice is a valid file):
each sub-block's scale (and min) minimises the weighted squared error
``sum w (value - x)^2`` with importance ``w = rms(super-block) + |x|``, over a
small grid of candidate scales each refitted by least squares (for Q4_K the
min is kept <= 0, as the format stores ``-min``); the sub-block scales are
then rounded to 6 (Q4_K) or 8 (Q6_K) bits against the super-block scale, and
every weight is re-rounded with the scales as stored.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

SUPER = 256
_ROWS_PER_CHUNK_ELEMENTS = 1 << 20  # weights quantized at a time: bounded temporaries for any tensor size


def quantize_k(a: np.ndarray, qtype: T) -> np.ndarray:
    """``a`` (float32 ``[rows, cols]``, cols % 256 == 0) as Q4_K or Q6_K bytes ``[rows, cols / 256 * blockbytes]``."""
    rows, cols = a.shape
    if cols % SUPER:
        raise ValueError(f"k-quants need rows of a multiple of {SUPER} weights, not {cols}")
    quantize_blocks = {T.Q4_K: q4_k_blocks, T.Q6_K: q6_k_blocks}[qtype]
    flat = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(-1, SUPER)
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // SUPER)
    out = [quantize_blocks(flat[i:i + step]) for i in range(0, flat.shape[0], step)]
    return torch.cat(out).numpy().reshape(rows, -1)


def _importance(x: torch.Tensor) -> torch.Tensor:
    """``rms(super-block) + |x|`` per weight, for ``x`` shaped ``[blocks, sub-blocks, n]``."""
    rms = x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    return rms + x.abs()


def fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (last dim): ``(scale >= 0, lo <= 0)`` with ``x ~ scale * q + lo``, ``q`` in 0..nmax."""
    lo = x.amin(-1).clamp(max=0)
    span = (x.amax(-1) - lo).clamp(min=1e-30)
    best_s, best_lo = span / nmax, lo
    best_err = _affine_error(x, w, best_s, best_lo, nmax)
    for k in range(steps + 1):
        q = ((x - lo[..., None]) * ((nmax - 1.0 + 0.1 * k) / span)[..., None]).round().clamp(0, nmax)
        s, m = _least_squares_affine(x, w, q)
        # with these codes: a bound on the error after re-rounding with (s, m)
        err = (w * (s[..., None] * q + m[..., None] - x).pow(2)).sum(-1)
        better = err < best_err
        best_s, best_lo = torch.where(better, s, best_s), torch.where(better, m, best_lo)
        best_err = torch.minimum(err, best_err)
    return best_s, best_lo


def _least_squares_affine(x, w, q) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares for ``x ~ s q + m`` with ``m <= 0`` (``m`` fixed at 0 where the free fit is positive)."""
    sw, sq, sqq = w.sum(-1), (w * q).sum(-1), (w * q * q).sum(-1)
    sx, sqx = (w * x).sum(-1), (w * q * x).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 0
    s = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, 1), 0)
    m = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, 1), 0)
    positive = m > 0
    s_no_min = torch.where(sqq > 0, sqx / sqq.clamp(min=1e-30), 0)
    return torch.where(positive, s_no_min, s).clamp(min=0), torch.where(positive, torch.zeros_like(m), m)


def _affine_error(x, w, s, lo, nmax) -> torch.Tensor:
    q = ((x - lo[..., None]) / s.clamp(min=1e-30)[..., None]).round().clamp(0, nmax)
    return (w * (s[..., None] * q + lo[..., None] - x).pow(2)).sum(-1)


def _f16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).to(torch.float32)


def q4_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``[n, 256]`` float32 -> ``[n, 144]`` uint8 Q4_K blocks."""
    x = blocks.reshape(-1, 8, 32)
    scale, lo = fit_affine(x, _importance(x), nmax=15)
    mins = -lo
    d, dmin = _f16(scale.amax(1) / 63), _f16(mins.amax(1) / 63)
    sc = torch.where(d[:, None] > 0, scale / d.clamp(min=1e-30)[:, None], 0).round().clamp(0, 63)
    mq = torch.where(dmin[:, None] > 0, mins / dmin.clamp(min=1e-30)[:, None], 0).round().clamp(0, 63)
    step, offset = d[:, None] * sc, dmin[:, None] * mq
    q = torch.where(step[..., None] > 0, (x + offset[..., None]) / step.clamp(min=1e-30)[..., None], 0)
    return pack_q4_k(d, dmin, sc.to(torch.uint8), mq.to(torch.uint8), q.round().clamp(0, 15).to(torch.uint8))


def pack_q4_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K bytes ``[n, 144]``: ``d``, ``dmin`` ``[n]``, 6-bit ``sc``, ``m`` ``[n, 8]``, codes ``q`` ``[n, 8, 32]``."""
    scales = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                        m[:, :4] | ((m[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], 1)
    pairs = q.reshape(-1, 4, 2, 32)
    codes = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scales, codes], 1)


def fit_symmetric(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row of ``x``: a signed scale with ``x ~ scale * q``, ``q`` in -32..31 (the largest |x| near -32)."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    best_s = torch.where(peak != 0, peak / -32.0, 0)
    best_err = _symmetric_error(x, w, best_s)
    for k in range(-8, 9):
        s0 = torch.where(peak != 0, peak / -(32.0 + 0.25 * k), 0)
        q = (x / torch.where(s0 != 0, s0, 1)[..., None]).round().clamp(-32, 31)
        sqq = (w * q * q).sum(-1)
        s = torch.where(sqq > 0, (w * q * x).sum(-1) / sqq.clamp(min=1e-30), 0)
        err = (w * (s[..., None] * q - x).pow(2)).sum(-1)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.minimum(err, best_err)
    return best_s


def _symmetric_error(x, w, s) -> torch.Tensor:
    q = (x / torch.where(s != 0, s, 1)[..., None]).round().clamp(-32, 31)
    return (w * (s[..., None] * q - x).pow(2)).sum(-1)


def q6_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``[n, 256]`` float32 -> ``[n, 210]`` uint8 Q6_K blocks."""
    x = blocks.reshape(-1, 16, 16)
    scale = fit_symmetric(x, _importance(x))
    d = _f16(scale.abs().amax(1) / 127)
    sc = torch.where(d[:, None] > 0, scale / d.clamp(min=1e-30)[:, None], 0).round().clamp(-128, 127)
    step = d[:, None] * sc
    q = torch.where(step[..., None] != 0, x / torch.where(step != 0, step, 1)[..., None], 0)
    return pack_q6_k(d, sc.to(torch.int8), (q.round().clamp(-32, 31) + 32).to(torch.uint8))


def pack_q6_k(d: torch.Tensor, sc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q6_K bytes ``[n, 210]`` from ``d`` ``[n]``, int8 ``sc`` ``[n, 16]`` and codes ``q`` (0..63) ``[n, 16, 16]``."""
    quarters = q.reshape(-1, 2, 4, 32)  # [n, half, quarter, l]: weight 128 h + 32 quarter + l
    lo, hi = quarters & 15, quarters >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2).reshape(-1, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    return torch.cat([ql, qh, sc.view(torch.uint8), _f16_bytes(d)], 1)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).view(torch.uint8).reshape(-1, 2)
