"""4-bit quantization (NF4 / FP4, double quantization) in pure PyTorch, byte-compatible with bitsandbytes.

Modules, bottom up:

* :mod:`~loraq.quant.codes` -- the code tables (NF4, FP4, the 8-bit dynamic map).
* :mod:`~loraq.quant.blockwise8` -- 8-bit blockwise quantization of the absmax vector.
* :mod:`~loraq.quant.functional` -- ``QuantState``, ``quantize_4bit``, ``dequantize_4bit``,
  ``dequantize_absmax``; :mod:`~loraq.quant.reference` -- the plain versions they are held to.
* :mod:`~loraq.quant.state_io` -- a QuantState as bitsandbytes' checkpoint tensors.
* :mod:`~loraq.quant.linear` -- ``Linear4bit``, the frozen 4-bit layer.
* :mod:`~loraq.quant.model` -- ``quantize_model_``, ``quantizable_layer_names``.
* :mod:`~loraq.quant.bnb_format` -- bitsandbytes pre-quantized HF folders, both ways.
* :mod:`~loraq.api.quantize` -- ``quantize(...)`` (``loraq quantize``).

bitsandbytes is never imported here; it is a test-only reference.
"""
from loraq.quant.errors import QuantizationError
from loraq.quant.functional import (
    QuantState,
    dequantize_4bit,
    dequantize_absmax,
    quantize_4bit,
)
from loraq.quant.linear import Linear4bit

__all__ = ["Linear4bit", "QuantState", "QuantizationError", "dequantize_4bit", "dequantize_absmax", "quantize_4bit"]
