"""The predicted peak memory of a training run, term by term, from how loraq allocates.

Notation: a batch of ``B`` rows of ``T`` tokens (``N = B T``; ``Nt`` of them
trained), ``L`` blocks of width ``d``, ``H`` query / ``Hkv`` key-value heads
of ``hd``, MLP width ``I``, vocabulary ``V``, ``e`` bytes per element of the
compute dtype, ``A`` adapter and ``P`` model parameters. A training step
holds at its peak (the start of backward, from the second step on, when
AdamW's moments exist)::

    weights      qlora: packed codes n/2 + scales (n/64 with double quant) per
                 4-bit layer, e per other parameter; lora: e P; full: 4 P
    head copy    V d e            a frozen head transposed for dh (CPU only; loss.LossBuffers)
    adapter      16 A             fp32 A/B, their gradients, AdamW's two moments
                 + e C            --init calibrated: the frozen pair beside the adapter (``C`` values, kept
                                  in the compute dtype; the [A; A0], [B, B0] copies a forward saves are
                                  measured with the activations)
    full         4 P grads + 8 P AdamW (+ 2 x linear params: autocast's bf16 weight copies)
    loss         min(128, Nt) V e  the logit chunk buffer; Nt d e the gradient dh kept for backward
    activations  measured: what autograd keeps in one training forward of the model's own blocks, run on
                 storage-less tensors (planning/probe.py: the method, dtype, autocast, attention path, LoRA / DoRA
                 / frozen pair and checkpointing as the run has them), scaled to L blocks and to the batch;
                 with --grad-checkpointing, the checkpoints plus one block recomputed in backward
    transient    N e (3 I + 2 d) + one dequantized weight   the first block's backward

On the CPU the peak is resident memory (what summary.json reports there), so
three terms join: the framework (Python, torch, transformers, loraq and its
generated kernels, the tokenizer), the tokenized data (the token store's
pages once read, and its index), and the memory the
exact-match generation before training used (its KV cache): glibc keeps
freed heap memory, and training's differently sized tensors do not reuse it.
The fourth is glibc's heap: from the second step on, resident memory runs
above the live bytes, because memory freed in one step is kept by the heap
and the next step's allocations, timed differently, do not all fit its holes
(``bench/NOTES.md``: 0-57% of the activations kept, across the configurations
measured, history-dependent run to run). Counted as :data:`CPU_HEAP_SHARE` (by dtype)
of the activation bytes a step allocates from the heap -- those in tensors
below glibc's largest mmap threshold, 32 MiB, with or without checkpointing,
which allocates them too, block by block
(:func:`loraq.planning.activations.heap_bytes`); a larger tensor is its own
mapping and goes back when freed -- a share measured
on those runs and checked on others, not derived: it is the one term of the
CPU plan that is an allowance rather than an account of tensors.
On CUDA the peak is ``torch.cuda.max_memory_allocated`` (tensors only; the
CUDA context, ~0.3-0.5 GB, and the caching allocator's slack come on top, and
:mod:`loraq.planning.fit` adds them before comparing with free memory); the
generation's memory is reused by training there, so it counts only if larger.
The activations are measured (:mod:`loraq.planning.probe`); the other terms
follow loraq's own code (``training/loss.py``, ``lora/node.py``, the
optimizer); a test holds the activation term to the bytes autograd actually
saves on small models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from loraq.planning.rows import RowShape
from loraq.planning.settings import RunSettings
from loraq.planning.shapes import ModelShape

# measured 2026-11-30 on the project's machine (torch 2.13 CPU, transformers 5.24): a process that imported
# torch, transformers and loraq's training modules and ran its generated kernels once (bench/NOTES.md)
CPU_FRAMEWORK_BYTES = 450_000_000
TOKENIZER_BYTES_PER_FILE_BYTE = 14  # a loaded fast tokenizer vs its tokenizer.json (SmolLM2: 3.5 MB -> 48 MB)
# the data is read from the memory-mapped token store (loraq.data.store): per example, the views' index
# arrays (measured 32-33 B at 127 and at 200,000 examples, taken as 40); per token, the store's pages once read
# (file-backed, but resident: ids in 2 bytes, 4 over a 65,536 vocabulary, and one mask bit)
DATA_BYTES_PER_EXAMPLE = 40
LOSS_CHUNK_ROWS = 128  # training.loss.fused_linear_cross_entropy's chunk_rows
# CPU only: resident memory glibc's heap keeps above the live bytes, as a share of the activation bytes a step
# allocates from it, by the compute dtype's bytes a value. 16-bit: chosen 2026-12-01 on ten bf16 configurations
# from SmolLM2 to a 1.1 B Llama, then checked on four held out; fp32: chosen 2026-12-07 on eight fp32 rows
# measured on a 2-core EPYC without AVX-512, whose steps kept 0.10-0.64 of it (one full row 1.23; bench/NOTES.md)
CPU_HEAP_SHARE = {2: 0.25, 4: 0.5}


@dataclass
class Estimate:
    """``terms``: (name, bytes) of the training step's peak; ``peak_bytes``: the largest phase's total."""

    terms: list[tuple[str, int]]
    step_bytes: int
    loading_bytes: int
    generation_bytes: int
    peak_bytes: int
    phase: str


def estimate(shape: ModelShape, rows: RowShape, run: RunSettings) -> Estimate:
    """The terms of the module docstring for ``run`` on ``shape`` with batches like ``rows``."""
    resident = _resident_terms(shape, rows, run)
    generation = _generation_bytes(shape, rows, run)
    step = _trained_state_terms(shape, run) + _step_terms(shape, rows, run)
    if run.device == "cpu" and generation:
        step.append(("exact-match generation before training (kept by malloc)", generation))
    terms = resident + step
    step_total = sum(b for _, b in terms)
    base = sum(size for _, size in resident)
    loading = base + _loading_transient(shape, run)
    gen_total = base + generation
    peak, phase = max((step_total, "training step"), (loading, "loading"), (gen_total, "exact-match generation"))
    return Estimate(terms=terms, step_bytes=step_total, loading_bytes=loading, generation_bytes=gen_total,
                    peak_bytes=peak, phase=phase)


def _resident_terms(shape: ModelShape, rows: RowShape, run: RunSettings) -> list[tuple[str, int]]:
    """What the process holds from loading on: framework and data (CPU), the weights."""
    terms: list[tuple[str, int]] = []
    if run.device == "cpu":
        terms.append(("framework (Python, torch, transformers, kernels, tokenizer)",
                      CPU_FRAMEWORK_BYTES + TOKENIZER_BYTES_PER_FILE_BYTE * shape.tokenizer_file_bytes))
        from loraq.data.store import id_dtype

        terms.append(("tokenized data (token store pages read, index)",  # ids, and one mask bit a token
                      int(rows.tokens * (id_dtype(shape.vocab).itemsize + 0.125))
                      + DATA_BYTES_PER_EXAMPLE * rows.examples))
    return terms + _weight_terms(shape, run)


def _trained_state_terms(shape: ModelShape, run: RunSettings) -> list[tuple[str, int]]:
    """What training adds whatever the batch: the adapter and its optimizer state (or AdamW over every weight)."""
    e = run.compute_bytes
    terms: list[tuple[str, int]] = []
    if run.method == "full":  # the gradients come with the step (they replace the activations in backward)
        terms.append(("AdamW moments (fp32)", 8 * shape.total_params))
    else:
        a = shape.adapter_params
        terms.append(("adapter weights + gradients (fp32)", 8 * a))
        terms.append(("AdamW moments (fp32)", 8 * a))
        # (the A/B copies each block's forward saves in the compute dtype are among the measured activations)
        c = shape.correction_params
        if c:
            terms.append((f"frozen correction of the 4-bit base ({_dtype(e)}, --init calibrated)", e * c))
        if run.device == "cpu":
            terms.append(("head copy (transposed, for dh)", shape.vocab * shape.hidden * e))
    return terms


def _weight_terms(shape: ModelShape, run: RunSettings) -> list[tuple[str, int]]:
    e = run.compute_bytes
    if run.method == "full":
        return [("weights (fp32, trained)", 4 * shape.total_params)]
    biases = sum(lin.out_features for lin in shape.linears if lin.bias)
    if run.method == "lora":
        return [(f"frozen weights ({_dtype(e)})", e * (shape.linear_params + biases + shape.other_params))]
    packed = sum(lin.numel for lin in shape.linears if lin.quantizable)
    dense = shape.linear_params - packed
    return [("frozen weights (4-bit codes + scales)", _packed_bytes(packed, run)),
            (f"frozen weights ({_dtype(e)}: embeddings, norms, head)", e * (dense + biases + shape.other_params))]


def _packed_bytes(numel: int, run: RunSettings) -> int:
    blocks = math.ceil(numel / run.blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) if run.double_quant else 4 * blocks
    return (numel + 1) // 2 + scales


def _dtype(e: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(e, f"{e}-byte")


def _step_terms(shape: ModelShape, rows: RowShape, run: RunSettings) -> list[tuple[str, int]]:
    """The batch-dependent part: loss buffers, activations kept for backward, the backward transient."""
    from loraq.planning.activations import activation_bytes, heap_bytes, transient_bytes

    e, b, t = run.compute_bytes, run.batch_size, rows.longest
    trained = min(b * rows.trained, b * t)
    v, d = shape.vocab, shape.hidden
    loss = min(LOSS_CHUNK_ROWS, trained) * v * e + trained * (d * e + 8)
    if not shape.fused_loss:  # the model's own [B, T, V] logits, their fp32 copy and its gradient
        loss = b * t * v * (e + 8)
    if run.method == "full":
        loss += v * d * 4  # dW of the head, computed in forward and kept for backward
    if run.eval_every and rows.has_val:
        loss += LOSS_CHUNK_ROWS * v * 4  # the evaluation's fp32 log-probability buffer stays with the loss
    label = "activations kept for backward" + (" (--grad-checkpointing)" if run.grad_checkpointing else "")
    terms = [("loss: logit chunk + dh", loss), (label, activation_bytes(shape, b, t, rows.varied, run)),
             ("backward transient (one block)", transient_bytes(shape, b, t, run))]
    if run.method == "full":
        if e < 4:
            terms.append(("autocast copies of the linear weights", e * shape.linear_params))
        # backward frees the activations as the fp32 gradients arrive; then AdamW's step takes temporaries
        # of its largest parameter. Counted: whatever of that exceeds what the start of backward holds.
        end = 4 * shape.total_params + 2 * 4 * shape.largest_param
        terms.append(("gradients (fp32) beyond the activations they replace", max(0, end - sum(x for _, x in terms))))
    if run.device == "cpu":
        share = CPU_HEAP_SHARE.get(e, CPU_HEAP_SHARE[4])
        terms.append((f"freed memory glibc's heap keeps ({share:.0%} of the activations it served)",
                      int(share * heap_bytes(shape, b, t, rows.varied, run))))
    return terms


def _generation_bytes(shape: ModelShape, rows: RowShape, run: RunSettings) -> int:
    """Exact match before training: the KV cache of every reference at its full length, the prefill's MLP
    temporaries and the last position's fp32 logits."""
    if not rows.eval_rows:
        return 0
    e, n = run.compute_bytes, rows.eval_rows
    kv = n * (rows.eval_prompt + rows.eval_new) * shape.layers * 2 * shape.kv_heads * shape.head_dim * e
    prefill = n * rows.eval_prompt * 3 * shape.intermediate * e
    return kv + prefill + 2 * n * shape.vocab * 4


def _loading_transient(shape: ModelShape, run: RunSettings) -> int:
    """Loading above the loaded weights: the 4-bit loader holds one tensor as stored; transformers' loader
    (lora, full) maps the files, whose pages stay resident until it is done -- unless the weights keep the
    stored dtype: then they are those pages (no copy; measured: a 1.04 GB bf16 model loaded for lora in bf16
    left 0.41 GB resident), and nothing comes on top."""
    if run.method == "qlora" or shape.prequantized or run.device != "cpu":
        return shape.largest_stored_bytes
    weights = 4 * shape.total_params if run.method == "full" else run.compute_bytes * shape.total_params
    as_stored = abs(shape.stored_bytes - weights) <= 0.01 * weights
    return shape.largest_stored_bytes if as_stored else shape.stored_bytes
