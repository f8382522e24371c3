"""The error a bad quantization input raises."""
from __future__ import annotations

from loraq.errors import LoraqError


class QuantizationError(LoraqError, ValueError):
    """A tensor or setting that cannot be quantized: bad blocksize or quant type,
    a non-floating, empty, NaN or inf weight. One line naming the parameter or layer.

    A ``ValueError`` too, so code that guards numeric input the usual way catches it.
    """
