"""Plain reference implementations of every fast path in :mod:`loraq.quant`.

Written to be read, not run on big tensors: block by block, element by
element where that is clearer, with no lookup tables. Tests hold the fast
paths (:mod:`loraq.quant.functional`, :mod:`loraq.quant.blockwise8`) equal
to these, bit for bit; see those modules for the math.
"""
from __future__ import annotations

import torch

from loraq.quant.blockwise8 import GRID_STEPS
from loraq.quant.codes import code_for, dynamic_map_signed

MIN_ABSMAX = 1e-38


class NearestCode:
    """Index into ``code`` of the entry nearest to a float32 value; on an exact midpoint, the lower entry.

    "Nearest" is decided by the float32 midpoints ``(a + b) / 2`` of
    neighbouring entries in value order; equal entries (FP4's two zeros) keep
    index order. Comparisons are on Python floats, which hold float32 exactly.
    """

    def __init__(self, code: torch.Tensor):
        self.order = sorted(range(len(code)), key=lambda i: (float(code[i]), i))
        self.midpoints = [float((code[a] + code[b]) / 2) for a, b in zip(self.order[:-1], self.order[1:])]

    def __call__(self, value: float) -> int:
        position = sum(1 for m in self.midpoints if float(value) > m)
        return self.order[position]


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True):
    """Returns (packed uint8 [(n + 1) // 2, 1], absmax, offset, nested_absmax) -- the last two None without
    double quant."""
    nearest = NearestCode(code_for(quant_type))
    flat = w.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    codes: list[int] = []
    absmax_list = []
    for start in range(0, n, blocksize):
        block = flat[start:start + blocksize]
        absmax = block.abs().max()
        floor = torch.clamp(absmax, min=MIN_ABSMAX)
        if block.numel() == blocksize:
            scaled = block * (1.0 / floor)  # full block: multiply by the reciprocal
        else:
            scaled = block / floor  # partial last block: divide (as bitsandbytes does)
            absmax = floor
        absmax_list.append(absmax)
        codes += [nearest(v) for v in scaled.clamp(-1.0, 1.0).tolist()]
    if n % 2:
        codes.append(nearest(0.0))
    packed = torch.tensor([(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)], dtype=torch.uint8)
    absmax = torch.stack(absmax_list)
    if not double_quant:
        return packed.view(-1, 1), absmax, None, None
    offset = absmax.mean()
    qabsmax, nested = quantize_blockwise_8bit(absmax - offset, dynamic_map_signed())
    return packed.view(-1, 1), qabsmax, offset, nested


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """Returns (uint8 codes, float32 absmax per block): grid point first, then the nearest code."""
    nearest = NearestCode(code)
    out, absmax_list = [], []
    for start in range(0, x.numel(), blocksize):
        block = x[start:start + blocksize]
        absmax = block.abs().max()
        absmax_list.append(absmax)
        for v in block:
            if absmax == 0:
                out.append(0)
                continue
            scaled = torch.clamp(v * (1.0 / absmax), -1.0, 1.0)
            t = ((scaled + 1.0) * 0.5) * float(GRID_STEPS) + 0.5
            grid_point = -1.0 + (2.0 * torch.floor(t)) / float(GRID_STEPS)
            out.append(nearest(grid_point))
    return torch.tensor(out, dtype=torch.uint8), torch.stack(absmax_list)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape, dtype: torch.dtype) -> torch.Tensor:
    """``code[nibble(i)] * absmax[i // blocksize]`` in float32, element by element, then cast; ``absmax`` float32."""
    flat = packed.reshape(-1)
    n = int(torch.Size(shape).numel())
    out = torch.empty(n, dtype=torch.float32)
    for i in range(n):
        byte = int(flat[i // 2])
        nibble = byte >> 4 if i % 2 == 0 else byte & 0x0F
        out[i] = code[nibble] * absmax[i // blocksize]
    return out.to(dtype).view(shape)


def dequantize_absmax(qabsmax: torch.Tensor, offset: torch.Tensor, nested: torch.Tensor,
                      nested_code: torch.Tensor, nested_blocksize: int = 256) -> torch.Tensor:
    """``nested_code[q[j]] * nested[j // 256] + offset`` in float32, element by element."""
    out = torch.empty(qabsmax.numel(), dtype=torch.float32)
    for j in range(qabsmax.numel()):
        out[j] = nested_code[int(qabsmax[j])] * nested[j // nested_blocksize]
    return out + offset
