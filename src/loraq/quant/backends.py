"""Fast paths for the 4-bit format, found through a registry (the way bitsandbytes registers its backends).

The format contract (:mod:`loraq.quant.functional`) imports no kernel: a fast
path registers itself here (``loraq.kernels.install()`` does so for the C and
generated dequantization kernels), and :func:`~loraq.quant.functional.dequantize_4bit`
tries the registered ones in order before its own eager path. A fast path
returns None where it does not apply (another device, dtype or shape), and
must give bitwise the eager path's result where it does (tests hold them so).
It is called as ``fast_path(packed, state, dtype, out=out)``: ``out`` is None
or a contiguous buffer of the weight's size in ``dtype`` that the result may
be written into (one that cannot, returns a new tensor instead).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# (packed, state, dtype, out=None) -> Tensor | None
Dequantizer = Callable[..., "torch.Tensor | None"]

_DEQUANTIZERS: list[tuple[str, Dequantizer]] = []


def register_dequantizer(name: str, fn: Dequantizer) -> None:
    """Add (or replace) a dequantization fast path; tried in the order registered."""
    for i, (existing, _) in enumerate(_DEQUANTIZERS):
        if existing == name:
            _DEQUANTIZERS[i] = (name, fn)
            return
    _DEQUANTIZERS.append((name, fn))


def dequantizers() -> list[tuple[str, Dequantizer]]:
    return list(_DEQUANTIZERS)


def clear() -> None:
    """Forget every registered fast path (tests; and the off switch)."""
    _DEQUANTIZERS.clear()
