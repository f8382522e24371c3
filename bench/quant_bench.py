"""loraq's 4-bit engine against bitsandbytes on CPU: stored bits, speed, and perplexity by data type.

    python bench/quant_bench.py                  # everything (perplexity takes a few minutes)
    python bench/quant_bench.py --no-perplexity  # bits and speed only
    python bench/quant_bench.py --threads 1      # pin intra-op threads (a busy shared machine)
    python bench/quant_bench.py --smoke          # small weights, 1 repeat, perplexity of a tiny random model

Prints, side by side:

1. stored bits per parameter of NF4 + double quantization at blocksize 64 (4.127);
2. quantize and dequantize time, loraq vs bitsandbytes (its native CPU kernel,
   and its pure-PyTorch fallback), for a 1536 x 576 and a 4096 x 4096 weight,
   as ratios (> 1: loraq is faster). Median wall time over repeats, plus the
   calling thread's CPU time (steadier when other jobs share the cores);
3. perplexity of SmolLM2-135M-Instruct on Python's own reference text
   (``pydoc_data.topics``) in full precision and with every linear layer but
   the head in int4 (blockwise absmax, 15 levels), FP4, NF4 and NF4 + double
   quantization (fp32 compute, so only the quantization error differs), the
   comparison of the QLoRA paper's Table 2.

bitsandbytes is imported here only as the reference being measured against.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402
from loraq.quant.functional import dequantize_4bit, quantize_4bit  # noqa: E402
from loraq.quant.model import quantizable_layer_names, quantize_model_  # noqa: E402

SHAPES = [(1536, 576), (4096, 4096)]


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall ms, median calling-thread CPU ms) of ``fn()`` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        walls.append((time.perf_counter() - w0) * 1e3)
        cpus.append((time.thread_time() - c0) * 1e3)
    return statistics.median(walls), statistics.median(cpus)


def stored_bits(shape: tuple[int, int] = (4096, 4096)) -> None:
    w = torch.randn(shape)
    for double_quant in (True, False):
        packed, state = quantize_4bit(w, 64, "nf4", double_quant)
        bits = (packed.numel() * 8 + state.scale_bits) / w.numel()
        print(f"stored bits/param, NF4 blocksize 64, double quant {double_quant!s:5}: {bits:.4f}")


def speed(repeats: int, shapes: list[tuple[int, int]] = SHAPES) -> None:
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):  # bitsandbytes' fallback is torch.compile-wrapped: time it eagerly
        _speed(repeats, shapes)


def _speed(repeats: int, shapes: list[tuple[int, int]]) -> None:
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    print(f"\nthreads: {torch.get_num_threads()}; load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'operation':44} {'loraq ms':>10} {'bnb ms':>10} {'ratio':>7}   (wall; thread CPU in brackets)")
    for shape in shapes:
        w = torch.randn(shape) * 0.02
        reps = repeats if w.numel() < 4e6 else max(3, repeats // 10)
        mine_q = timed(lambda: quantize_4bit(w, 64, "nf4", True), max(3, reps // 5))
        theirs_q = timed(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                         max(3, reps // 5))
        _row(f"quantize {shape[0]}x{shape[1]} fp32, nf4+dq", mine_q, theirs_q)

        packed, state = quantize_4bit(w, 64, "nf4", True)
        ref_packed, ref = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ref.dtype = torch.bfloat16  # bitsandbytes then dequantizes straight into bf16, as its matmul path does
        mine_d = timed(lambda: dequantize_4bit(packed, state, torch.bfloat16), reps)
        theirs_d = timed(lambda: bnbf.dequantize_4bit(ref_packed, ref), reps)
        _row(f"dequantize {shape[0]}x{shape[1]} -> bf16 (native kernel)", mine_d, theirs_d)

        def fallback():
            absmax = bnbf.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
            return _dequantize_4bit_compute(ref_packed.view(-1), absmax, ref.code, 64, shape, torch.bfloat16)

        _row(f"dequantize {shape[0]}x{shape[1]} -> bf16 (PyTorch fallback)", mine_d, timed(fallback, reps))


def _row(label: str, mine: tuple[float, float], theirs: tuple[float, float]) -> None:
    print(f"{label:44} {mine[0]:10.3f} {theirs[0]:10.3f} {theirs[0] / mine[0]:7.2f}   "
          f"[{mine[1]:.3f} / {theirs[1]:.3f} -> {theirs[1] / mine[1]:.2f}]")


def fake_int4_(model: torch.nn.Module, blocksize: int = 64) -> None:
    """Plain int4: each block of ``blocksize`` weights scaled by its absmax to 15 levels, ``round(7 w / a) a / 7``."""
    with torch.no_grad():
        for name in quantizable_layer_names(model):
            weight = model.get_submodule(name).weight
            blocks = weight.view(-1, blocksize)
            absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
            blocks.copy_(torch.round(blocks / absmax * 7).clamp(-7, 7) * absmax / 7)


def perplexity(model_dir: str, sequences: int, seq_len: int) -> None:
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "\n\n".join(topics.values())
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: sequences * seq_len].view(sequences, seq_len)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    variants = {
        "full precision (fp32)": lambda m: None,
        "int4 (absmax, blocksize 64)": fake_int4_,
        "FP4": lambda m: quantize_model_(m, "fp4", False, 64, torch.float32),
        "NF4": lambda m: quantize_model_(m, "nf4", False, 64, torch.float32),
        "NF4 + double quant": lambda m: quantize_model_(m, "nf4", True, 64, torch.float32),
    }
    print(f"\nperplexity of {os.path.basename(model_dir.rstrip('/'))} on pydoc_data.topics, "
          f"{sequences} x {seq_len} tokens (all linear layers but the head quantized; fp32 compute)")
    print("| weights | perplexity |\n|---|---|")
    for label, apply in variants.items():
        model = copy.deepcopy(base)
        apply(model)
        with torch.no_grad():
            losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in ids]
        print(f"| {label} | {math.exp(statistics.mean(losses)):.2f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per operation (fewer for large ones)")
    parser.add_argument("--no-perplexity", action="store_true", help="bits and speed only")
    parser.add_argument("--sequences", type=int, default=32, help="rows of text whose perplexity is measured")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--model", default=None, help="HF folder (default: loraq's default model)")
    smoke.add_flag(parser, "a 256 x 128 weight, 1 repeat, 1 row of 64 tokens of a tiny random model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.smoke:
        smoke.setup()
        stored_bits((256, 128))
        speed(1, [(256, 128)])
        if not args.no_perplexity:
            perplexity(str(smoke.tiny_model()), 1, 64)
        return
    stored_bits()
    speed(args.repeats)
    if not args.no_perplexity:
        from loraq.models.default import ensure_default_model

        perplexity(args.model or str(ensure_default_model()), args.sequences, args.seq_len)


if __name__ == "__main__":
    main()
