"""The C and the generated (Inductor) dequantization kernels against the eager path, interleaved in one process.

For each case the three paths alternate call by call (``--reps`` rounds, after a
warm-up that also compiles), and the median time of each is printed with the
ratio. Cases: NF4 + double-quant dequantization to bf16 of SmolLM2's weight
shapes (576 x 576, 1536 x 576) and of 4096 x 4096, by the eager path, the
Inductor-generated kernel and the C kernel (``loraq.kernels.native``).

    python bench/kernel_bench.py [--threads 2] [--reps 30]
    python bench/kernel_bench.py --smoke     # a 128 x 64 weight, 2 rounds; a kernel not built is reported, not fatal
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

SHAPES = ((576, 576), (1536, 576), (4096, 4096))


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--reps", type=int, default=30, help="rounds of the three paths, after the warm-up")
    smoke.add_flag(ap, "a 128 x 64 weight; under LORAQ_COMPILE=0 (a smoke's default) only the eager path runs")
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.smoke:
        smoke.setup()
        shapes, args.reps = ((128, 64),), 2
    else:
        torch.set_num_threads(args.threads)

    from loraq.kernels.dequant import dequantize_generated
    from loraq.kernels.native import dequantize_native
    from loraq.quant.functional import dequantize_4bit_eager, quantize_4bit

    print(f"# dequantization kernels vs the eager path -- {dt.date.today()} -- "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
          f"{' -- SMOKE RUN, not a measurement' if args.smoke else ''}\n")
    print("| NF4 + DQ dequantize -> bf16 | eager | generated | C kernel | generated vs eager | C vs generated |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
        packed, state = quantize_4bit(w, 64, "nf4", double_quant=True)
        ref = dequantize_4bit_eager(packed, state, torch.bfloat16)
        paths = [dequantize_4bit_eager, dequantize_generated, dequantize_native]
        for path in paths[1:]:
            out = path(packed, state, torch.bfloat16)
            if out is None and args.smoke:
                print(f"smoke: {path.__name__} not built here (LORAQ_COMPILE=0 or no compiler): eager in its place")
                continue
            assert out is not None, f"{path.__name__} unavailable (LORAQ_COMPILE=0 or no compiler)"
            assert torch.equal(out, ref)
        if args.smoke:
            paths = [path if path(packed, state, torch.bfloat16) is not None else dequantize_4bit_eager
                     for path in paths]
        times = [[] for _ in paths]
        for _ in range(args.reps):
            for t, path in zip(times, paths):
                t.append(timed(path, packed, state, torch.bfloat16))
        e, f, c = (statistics.median(t) for t in times)
        print(f"| {shape[0]} x {shape[1]} | {e * 1e3:.3f} ms | {f * 1e3:.3f} ms | {c * 1e3:.3f} ms | {e / f:.2f}x "
              f"| {f / c:.2f}x |")


if __name__ == "__main__":
    main()
