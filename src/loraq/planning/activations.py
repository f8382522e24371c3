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
"""
from __future__ import annotations

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


def _blocks(shape: ModelShape) -> list[list[LinearShape]]:
    by_layer: dict[int, list[LinearShape]] = {i: [] for i in range(shape.layers)}
    for lin in shape.linears:
        if lin.layer is not None and lin.layer in by_layer:
            by_layer[lin.layer].append(lin)
    return list(by_layer.values())


def block_bytes(shape: ModelShape, linears: list[LinearShape], batch: int, length: int, masked: bool,
                run: RunSettings) -> int:
    """One decoder block's saved tensors (see the module docstring)."""
    n, e, d, inter = batch * length, run.compute_bytes, shape.hidden, shape.intermediate
    full = run.method == "full"
    autocast = full and e < 4
    residual = 4 if autocast else e
    if shape.lean_blocks:
        norms = 2 * n * (d * residual + 4)
        mlp = 2 * n * inter * e
    else:  # autograd's own RMSNorm keeps a float32 copy and the normalised value; SiLU-gate keeps three
        norms = 2 * n * (2 * d * 4 + 4)
        mlp = 3 * n * inter * e
    if autocast:
        inputs = sum(n * lin.in_features * e for lin in linears)
    else:
        groups = {lin.input_group: lin.in_features for lin in linears if lin.rank or full}
        inputs = sum(n * width * e for width in groups.values())
    low_rank = sum(n * lin.rank * e for lin in linears)
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
