"""Activations a training forward keeps for backward, and the largest temporary of the backward that follows.

What the forward keeps is measured, not modelled: :mod:`loraq.planning.probe`
runs the model's own blocks on storage-less tensors and records what autograd
saves (for the run's method, dtype, autocast, checkpointing, attention path
and LoRA / DoRA / correction settings). Under ``--grad-checkpointing`` the
forward keeps each block's input, and backward recomputes one block at a
time: the plan counts the checkpointed forward plus the first block as it is
recomputed (its full activations).

:func:`heap_bytes` is the part of those activations that glibc's heap serves
(and keeps when freed, see :mod:`loraq.planning.estimate`): tensors below its
largest dynamic mmap threshold, 32 MiB on 64-bit Linux; a larger tensor is a
mapping of its own, returned to the system when freed.

:func:`transient_bytes` is the backward of loraq's own nodes (the gated
activation's gradients, a dequantized weight), from their code.
"""
from __future__ import annotations

import torch

from loraq.planning.probe import ProbeRun, SavedTensors
from loraq.planning.settings import RunSettings
from loraq.planning.shapes import ModelShape

GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX for 64-bit glibc


def probe_run(run: RunSettings, checkpointing: bool | None = None) -> ProbeRun:
    """The probe's description of ``run`` (``checkpointing`` overrides the run's)."""
    dtype = torch.float32 if run.compute_bytes == 4 else torch.bfloat16  # fp16 keeps the same bytes as bf16
    ckpt = run.grad_checkpointing if checkpointing is None else checkpointing
    return ProbeRun(run.method, dtype, run.device, ckpt, None if run.method == "full" else run.lora,
                    (run.quant_type, run.double_quant, run.blocksize))


def saved_tensors(shape: ModelShape, batch: int, length: int, masked: bool, run: RunSettings,
                  checkpointing: bool | None = None) -> SavedTensors:
    return shape.probe.saved(probe_run(run, checkpointing), batch, length, masked)


def activation_bytes(shape: ModelShape, batch: int, length: int, masked: bool, run: RunSettings) -> int:
    """Bytes kept between forward and backward for a batch of ``batch`` rows of ``length`` tokens (with
    checkpointing: the block inputs and one block recomputed)."""
    kept = saved_tensors(shape, batch, length, masked, run).total(batch, length)
    if not run.grad_checkpointing:
        return kept
    block = saved_tensors(shape, batch, length, masked, run, checkpointing=False)
    return kept + block.first_block(batch, length)


def forward_bytes(shape: ModelShape, batch: int, length: int, masked: bool, run: RunSettings) -> int:
    """What the forward alone keeps (with checkpointing, only the checkpoints)."""
    return saved_tensors(shape, batch, length, masked, run).total(batch, length)


def heap_bytes(shape: ModelShape, batch: int, length: int, masked: bool, run: RunSettings,
               limit: int = GLIBC_MMAP_THRESHOLD_MAX) -> int:
    """The activation bytes a step allocates and frees in tensors glibc's heap serves, those below ``limit``
    bytes. With or without checkpointing: a checkpointed forward allocates each block's activations too (and
    frees them), and backward allocates them again, one block at a time."""
    return saved_tensors(shape, batch, length, masked, run, checkpointing=False).below(batch, length, limit)


def transient_bytes(shape: ModelShape, batch: int, length: int, run: RunSettings) -> int:
    """The backward of the last block's MLP at its widest: the gradients of the gate's two inputs and of
    their product, two hidden-size gradients, and one dequantized (or cast) weight."""
    n, e = batch * length, run.compute_bytes
    widest = max((lin.numel for lin in shape.linears), default=0)
    dense = widest * e if run.method == "qlora" or (run.method == "full" and e < 4) else 0
    return n * e * (3 * shape.intermediate + 2 * shape.hidden) + dense


__all__ = ["GLIBC_MMAP_THRESHOLD_MAX", "activation_bytes", "forward_bytes", "heap_bytes", "probe_run",
           "saved_tensors", "transient_bytes"]
