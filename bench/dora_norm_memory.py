"""Peak memory of DoRA's weight norms on one 4-bit layer: in row chunks (loraq) vs from a whole dequantized copy.

Each way runs in a fresh process; reported is the growth of the peak resident set over the process's size
just before the norms (Linux: the peak is reset through ``/proc/self/clear_refs`` and read as ``VmHWM``),
for an 11008 x 4096 NF4 weight (a 7B model's MLP projection) and r=16.

    python bench/dora_norm_memory.py
    python bench/dora_norm_memory.py --smoke     # a 256 x 128 weight, r=4, both ways in this process
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

OUT, IN, R = 11008, 4096, 16
SMOKE = 256, 128, 4


def child(way: str, shape: tuple[int, int, int] = (OUT, IN, R)) -> None:
    import gc

    import torch

    from loraq.lora import dora
    from loraq.quant.functional import dequantize_4bit, quantize_4bit
    from loraq.quant.linear import Linear4bit

    rows, cols, rank = shape
    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(rows, cols, dtype=torch.bfloat16))
    layer = Linear4bit(packed, state, None, torch.bfloat16)
    a, b = torch.randn(rank, cols), torch.randn(rows, rank) * 0.01
    gc.collect()
    before = reset_peak()
    with torch.no_grad():
        if way == "chunks":
            norms = dora.weight_norm(layer, a, b, 2.0)
        else:  # the whole weight dequantized, then W + s B A, then its row norms (PEFT's way)
            w = dequantize_4bit(layer.weight, layer.quant_state, torch.float32)
            norms = torch.linalg.vector_norm(w + 2.0 * (b @ a), dim=1)
    print(json.dumps({"way": way, "peak_growth_mb": (status_kb("VmHWM") - before) / 1024,
                      "norm_sum": float(norms.sum())}))


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> int:
    """Set the peak resident size back to the current one where the kernel allows; returns it (kB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not allowed here: the growth is then measured from the process's earlier peak
        pass
    return status_kb("VmRSS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("way", nargs="?", choices=("chunks", "whole"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--smoke", action="store_true",
                        help="a 256 x 128 weight, r=4, both ways in this process: checks the benchmark still runs")
    args = parser.parse_args(argv)
    if args.way:
        child(args.way)
        return
    if args.smoke:
        for way in ("chunks", "whole"):
            child(way, SMOKE)
        return
    for way in ("chunks", "whole"):
        out = subprocess.run([sys.executable, __file__, way], capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
