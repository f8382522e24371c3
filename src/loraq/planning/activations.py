"""Activations a training forward keeps for backward, and the largest temporary of the backward that follows.

Counted from what loraq's autograd nodes save (the formulas are in
:mod:`loraq.planning.estimate`'s docstring): :class:`loraq.lora.node.LoraLinearFunction`
keeps its input (shared by the linears that read the same tensor) and
``x A^T``; :mod:`loraq.kernels.norm_gate` keeps each RMSNorm's input and
``1/rms`` and the SiLU gate's two inputs; :class:`loraq.kernels.attention.GroupedAttention`
keeps the scaled queries, keys, values and the probabilities of the causal
blocks it computes; SDPA keeps queries, keys, values and the log-sum-exp.
Under ``--method full`` with a 16-bit compute dtype, autocast casts each
linear's input on its own (one saved copy per linear) and the residual
stream, queries and keys stay in float32.

:func:`heap_bytes` is the part of those activations that glibc's heap serves
(and keeps when freed, see :mod:`loraq.planning.estimate`): tensors below its
largest dynamic mmap threshold, 32 MiB on 64-bit Linux; a larger tensor is a
mapping of its own, returned to the system when freed. Counted by width: the
``[N, I]`` tensors (the gate's inputs, the down projection's), and the rest,
which are ``[N, d]`` or narrower.
"""
from __future__ import annotations

import dataclasses

from loraq.planning.settings import RunSettings
from loraq.planning.shapes import LinearShape, ModelShape


def activation_bytes(shape: ModelShape, batch: int, length: int, masked: bool, run: RunSettings) -> int:
    """Bytes kept between forward and backward for a batch of ``batch`` rows of ``length`` tokens."""
    n = batch * length
    e = run.compute_bytes
    autocast = run.method == "full" and e < 4
    residual = 4 if autocast else e
    rope = 2 * n * shape.head_dim * residual  # cos and sin, computed once and shared by the blocks
    # each block counts its two norm inputs; the first block's input is kept only when the embedding trains
    # (full), and the final norm's input takes its place otherwise
    final = n * 4 + (n * shape.hidden * residual if run.method == "full" else 0)
    blocks = _blocks(shape)
    if run.grad_checkpointing:  # each block's input (and the final norm's), then one block recomputed at a time
        kept = (shape.layers + 1) * n * shape.hidden * residual + n * 4
        largest = max(block_bytes(shape, lins, batch, length, masked, run) for lins in blocks)
        return rope + kept + largest
    return rope + final + sum(block_bytes(shape, lins, batch, length, masked, run) for lins in blocks)


GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX for 64-bit glibc


def heap_bytes(shape: ModelShape, batch: int, length: int, masked: bool, run: RunSettings,
               limit: int = GLIBC_MMAP_THRESHOLD_MAX) -> int:
    """The activation bytes a step allocates and frees in tensors glibc's heap serves, those below ``limit``
    bytes: all of them less the tensors wider than ``[N, d]`` (the gate's inputs, the down projection's) at
    or above it, and none once an ``[N, d]`` tensor is (the narrower ones, ``x A^T`` and the norms' ``1/rms``,
    are then counted out too). With or without checkpointing: a checkpointed forward allocates each block's
    activations too (and frees them), and backward allocates them again, one block at a time."""
    run = dataclasses.replace(run, grad_checkpointing=False)
    n, e = batch * length, run.compute_bytes
    residual = 4 if run.method == "full" and e < 4 else e
    if n * shape.hidden * residual >= limit:
        return 0
    wide = [_wide_bytes(shape, lins, n, run, limit) for lins in _blocks(shape)]
    total = activation_bytes(shape, batch, length, masked, run)
    return total - sum(wide)


def _wide_bytes(shape: ModelShape, linears: list[LinearShape], n: int, run: RunSettings, limit: int) -> int:
    e = run.compute_bytes
    sizes = [n * width * e for width in _input_widths(linears, run) if width > shape.hidden]
    sizes += [n * shape.intermediate * e] * (2 if shape.lean_blocks else 3)
    return sum(size for size in sizes if size >= limit)


def _input_widths(linears: list[LinearShape], run: RunSettings) -> list[int]:
    """Widths of the saved inputs of a block's linears: one per linear under autocast (each casts its own),
    else one per group of linears reading the same tensor (q/k/v, gate/up), adapted or trained ones only."""
    full = run.method == "full"
    if full and run.compute_bytes < 4:
        return [lin.in_features for lin in linears]
    return list({lin.input_group: lin.in_features for lin in linears if lin.rank or full}.values())


def _blocks(shape: ModelShape) -> list[list[LinearShape]]:
    by_layer: dict[int, list[LinearShape]] = {i: [] for i in range(shape.layers)}
    for lin in shape.linears:
        if lin.layer is not None and lin.layer in by_layer:
            by_layer[lin.layer].append(lin)
    return list(by_layer.values())


def block_bytes(shape: ModelShape, linears: list[LinearShape], batch: int, length: int, masked: bool,
                run: RunSettings) -> int:
    """One decoder block's saved tensors (see the module docstring)."""
    n, e, d = batch * length, run.compute_bytes, shape.hidden
    residual = 4 if run.method == "full" and e < 4 else e
    if shape.lean_blocks:
        norms = 2 * n * (d * residual + 4)
    else:  # autograd's own RMSNorm keeps a float32 copy and the normalised value; SiLU-gate keeps three
        norms = 2 * n * (2 * d * 4 + 4)
    mlp = (2 if shape.lean_blocks else 3) * n * shape.intermediate * e
    inputs = sum(n * width * e for width in _input_widths(linears, run))
    low_rank = sum(n * (lin.rank + lin.correction_rank) * e for lin in linears)
    return norms + mlp + inputs + low_rank + attention_bytes(shape, batch, length, masked, run)


def attention_bytes(shape: ModelShape, batch: int, length: int, masked: bool, run: RunSettings) -> int:
    """Queries, keys, values and the softmax statistics attention keeps for backward (one block)."""
    from loraq.kernels.attention import MAX_SAVED_BYTES, causal_blocks

    n, e = batch * length, run.compute_bytes
    h, hkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    qk = 4 if run.method == "full" and e < 4 else e
    matmul_path = (run.device == "cpu" and shape.sdpa and shape.attention_dropout == 0.0 and length > 1
                   and h % hkv == 0 and batch * h * length * length * e <= MAX_SAVED_BYTES)
    if matmul_path:
        probs = e * batch * h * sum((t1 - t0) * t1 for t0, t1 in causal_blocks(length, None, True))
        return n * h * hd * qk + n * hkv * hd * (qk + e) + probs
    repeated = masked and h != hkv  # transformers repeats K/V to every head when SDPA gets a mask
    kv = 2 * n * (h if repeated else hkv) * hd * e
    mask = batch * length * length * e if masked else 0
    out = n * h * hd * e if run.device != "cpu" else 0  # the CPU kernel's output is the o_proj input itself
    return n * h * hd * e + kv + 4 * n * h + mask + out


def transient_bytes(shape: ModelShape, batch: int, length: int, run: RunSettings) -> int:
    """The backward of the last block's MLP at its widest: the gradients of the gate's two inputs and of
    their product, two hidden-size gradients, and one dequantized (or cast) weight."""
    n, e = batch * length, run.compute_bytes
    widest = max((lin.numel for lin in shape.linears), default=0)
    dense = widest * e if run.method == "qlora" or (run.method == "full" and e < 4) else 0
    return n * e * (3 * shape.intermediate + 2 * shape.hidden) + dense
