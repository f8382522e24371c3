"""Code tables: the values a 4-bit or 8-bit code stands for.

All tables are float32 and carry bitsandbytes' exact values, so that bytes
written here mean the same thing to bitsandbytes and back.

* ``NF4_CODE`` -- 4-bit NormalFloat (QLoRA): 16 quantiles of N(0, 1), rescaled
  to [-1, 1], with an exact zero at index 7. Sorted ascending.
* ``FP4_CODE`` -- bitsandbytes' E2M1 variant. Bit 3 is the sign; the low three
  bits select a magnitude from ``[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12`` (NOT in
  value order). Index 8 is a second +0.0, not -0.0.
* ``dynamic_map_signed()`` -- the signed 8-bit "dynamic" code used to
  quantize the absmax vector in double quantization: for exponents
  ``e = 0..6`` there are ``2**e`` values ``10**(e-6) * m`` (and their
  negatives), ``m`` the midpoints of ``linspace(0.1, 1, 2**e + 1)``; plus 0
  and 1.0. 256 values, sorted ascending, range [-0.99297, 1.0].
"""
from __future__ import annotations

import functools

import torch

from loraq.choices import QUANT_TYPES
from loraq.quant.errors import QuantizationError

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
# float32 division by the largest magnitude, as bitsandbytes normalises its table;
# the second half is the negated first half, except that "-0" stays +0.0
FP4_CODE = torch.tensor(_FP4_MAGNITUDES + [-m if m else 0.0 for m in _FP4_MAGNITUDES], dtype=torch.float32) / 12.0


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 code table of ``quant_type`` ("nf4" or "fp4")."""
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_CODE
    raise QuantizationError(f"quant_type {quant_type!r} is not one of: {', '.join(QUANT_TYPES)}")


def quant_type_of(code: torch.Tensor) -> str:
    """Which 4-bit table ``code`` is (bitsandbytes stores the table itself in ``quant_map``)."""
    code = code.detach().to("cpu", torch.float32)
    for name in QUANT_TYPES:
        if torch.equal(code, code_for(name)):
            return name
    raise QuantizationError("quant_map is neither the NF4 nor the FP4 table; "
                            "the file was not written by bitsandbytes or loraq")


@functools.cache
def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: float32 [256], sorted.

    Every step is float32 arithmetic (linspace, midpoint, scale), because the
    table's last bits depend on it.
    """
    values: list[float] = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1.0, 2**exponent + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (exponent - 6)) * midpoints
        values += scaled.tolist() + (-scaled).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def sorted_order(code: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``code`` ascending, ties kept in index order (FP4's two zeros: 0 before 8)."""
    return torch.sort(code, stable=True).indices


def midpoints(sorted_code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring sorted codes, float32: ``(c[i] + c[i+1]) / 2``."""
    return (sorted_code[:-1] + sorted_code[1:]) / 2
