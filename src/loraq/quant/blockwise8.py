"""Blockwise 8-bit quantization with a 256-entry code: the second level of double quantization.

Double quantization stores the per-block absmax vector of a 4-bit weight in
8 bits: ``offset = absmax.mean()``; ``absmax - offset`` is cut into blocks of
256, each block scaled by its own float32 absmax ``s`` into [-1, 1] and coded
with :func:`loraq.quant.codes.dynamic_map_signed`.

Rounding follows bitsandbytes' CPU kernel exactly (that is what makes the
bytes identical): the scaled value ``v = x * (1/s)`` (float32) is first put on
a grid of 65536 points, ``g = trunc(((v + 1) * 0.5) * 65535 + 0.5)``, and the
grid point ``-1 + 2g/65535`` then goes to the nearest code (midpoint ties go
down). This is the nearest code for all but values within half a grid step
(1.5e-5) of a midpoint. A block whose absmax is 0 codes to 0.

Dequantization: ``x = code[q] * s`` in float32.
"""
from __future__ import annotations

import functools

import torch

from loraq.quant.codes import midpoints

GRID_STEPS = 65535  # grid points 0..65535 over [-1, 1]


def grid_index(scaled: torch.Tensor) -> torch.Tensor:
    """Grid index in 0..65535 of float32 values in [-1, 1], each step rounded to float32 as in bnb's kernel."""
    t = (scaled.clamp(-1.0, 1.0) + 1.0) * 0.5
    t = t * float(GRID_STEPS) + 0.5
    return t.to(torch.int32)  # truncation toward zero; t >= 0.5 here


def grid_value(index: torch.Tensor) -> torch.Tensor:
    """The float32 value of grid point ``index``: ``-1 + (2 * index) / 65535``."""
    return -1.0 + (2.0 * index.to(torch.float32)) / float(GRID_STEPS)


@functools.lru_cache(maxsize=8)
def _grid_lut_cached(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    points = grid_value(torch.arange(GRID_STEPS + 1, dtype=torch.int32))
    # code index = number of midpoints strictly below the grid point
    return torch.searchsorted(midpoints(code), points, right=False).to(torch.uint8)


def grid_lut(code: torch.Tensor) -> torch.Tensor:
    """uint8 [65536]: grid index -> code index (CPU tensor, cached per code table)."""
    return _grid_lut_cached(code.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def _padded_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A flat tensor as [n_blocks, blocksize], the last block padded with zeros (which change no absmax)."""
    pad = -x.numel() % blocksize
    return torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor,
                            blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a flat float32 tensor: returns (uint8 codes [n], float32 absmax [ceil(n / blocksize)])."""
    x = x.reshape(-1).to(torch.float32)
    blocks = _padded_blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * torch.reciprocal(absmax)[:, None]
    scaled = torch.where(absmax[:, None] == 0, -1.0, scaled)  # a zero block: grid 0 -> code 0
    codes = grid_lut(code).to(x.device)[grid_index(scaled).reshape(-1).long()]
    return codes[: x.numel()], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                              code: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """float32 [n]: ``code[codes[i]] * absmax[i // blocksize]``."""
    values = code.to(codes.device)[codes.reshape(-1).long()]
    return (_padded_blocks(values, blocksize) * absmax[:, None]).reshape(-1)[: values.numel()]
