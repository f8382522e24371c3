"""Fast paths for training on the hardware at hand, each beside the plain reference it must equal.

Two ways in, both explicit:

* :func:`install` registers the 4-bit dequantization kernels into the
  format's registry (:mod:`loraq.quant.backends`): the C kernel
  (:mod:`~loraq.kernels.native`), then the generated one
  (:mod:`~loraq.kernels.dequant`); and the product of a few rows with a
  4-bit weight read from its codes (:mod:`~loraq.kernels.gemv4`, decoding).
  With ``LORAQ_COMPILE=0`` it registers nothing and the eager references
  run. Model loading calls it. An int8 copy of a float weight with a
  product for 1-16 rows (:mod:`~loraq.kernels.gemv8`, decoding's output
  head) is there for the decode engine to call; nothing registers it.
* :func:`apply_fast_paths` swaps the matmul attention
  (:mod:`~loraq.kernels.attention`) and the lean RMSNorm / gated-activation
  autograd (:mod:`~loraq.kernels.norm_gate`) into a model for training, on the
  module classes :mod:`~loraq.kernels.families` lists, and says what it did.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import torch

    from loraq.kernels.families import FastPaths


def install() -> bool:
    """Register the dequantization and product fast paths (idempotent); False when kernels are switched off."""
    from loraq.quant.backends import register_dequantizer, register_product

    if os.environ.get("LORAQ_COMPILE", "1").lower() in {"0", "false", "no", "off"}:
        return False
    from loraq.kernels.dequant import dequantize_generated
    from loraq.kernels.gemv4 import matmul_4bit_native
    from loraq.kernels.native import dequantize_native

    register_dequantizer("native", dequantize_native)  # CPU, float32 / bf16 output
    register_dequantizer("generated", dequantize_generated)  # CPU float16, CUDA
    register_product("native", matmul_4bit_native)  # CPU, 1-16 rows of float32 / bf16
    return True


def apply_fast_paths(model: nn.Module, device: torch.device | None = None) -> FastPaths:
    """loraq's matmul attention for short CPU sequences (it hands everything else to SDPA), and the lean
    RMSNorm / gated-activation autograd on the module classes checked for it; returns what is on and why
    the rest is not (:meth:`~loraq.kernels.families.FastPaths.line`). ``device``: where it will train (default:
    where its weights are)."""
    from loraq.kernels.families import FastPaths, apply_norm_gate_modules, attention_fallback

    report = FastPaths()
    _stop_hub_kernelization(model)
    apply_norm_gate_modules(model, report)
    report.attention = attention_fallback(model, device)
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and model._can_set_attn_implementation():
        from loraq.kernels.attention import register

        model.set_attn_implementation(register())
    return report


def _stop_hub_kernelization(model: nn.Module) -> None:
    """Switch off transformers' hub kernels (``use_kernels``, on by default for loaded models since transformers
    5.25 when the ``kernels`` package is present): they re-kernelize on every ``train()`` / ``eval()``, which puts
    each decorated module's own ``forward`` back over loraq's (the RMSNorms lost their lean autograd)."""
    if getattr(model, "use_kernels", False):
        model.use_kernels = False
