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

A second registry holds products (:func:`register_product`): ``product(x, packed, state, bias)`` returns
``F.linear(x, W, bias)`` for the 4-bit ``W`` without autograd, or None where it does not apply;
:func:`~loraq.quant.functional.matmul_4bit` tries them in order where no gradient is asked for. A product
sums in another order than the reference (not bitwise): tests hold it to float64 within float32 rounding.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# (packed, state, dtype, out=None) -> Tensor | None
Dequantizer = Callable[..., "torch.Tensor | None"]

# (x, packed, state, bias) -> Tensor | None
Product = Callable[..., "torch.Tensor | None"]

_DEQUANTIZERS: list[tuple[str, Dequantizer]] = []
_PRODUCTS: list[tuple[str, Product]] = []


def _register(registry: list, name: str, fn: Callable) -> None:
    for i, (existing, _) in enumerate(registry):
        if existing == name:
            registry[i] = (name, fn)
            return
    registry.append((name, fn))


def register_dequantizer(name: str, fn: Dequantizer) -> None:
    """Add (or replace) a dequantization fast path; tried in the order registered."""
    _register(_DEQUANTIZERS, name, fn)


def dequantizers() -> list[tuple[str, Dequantizer]]:
    return list(_DEQUANTIZERS)


def register_product(name: str, fn: Product) -> None:
    """Add (or replace) a fast path for ``F.linear(x, dequantized W, bias)``; tried in the order registered."""
    _register(_PRODUCTS, name, fn)


def products() -> list[tuple[str, Product]]:
    return list(_PRODUCTS)


def clear() -> None:
    """Forget every registered fast path, dequantizers and products (tests; and the off switch)."""
    _DEQUANTIZERS.clear()
    _PRODUCTS.clear()
