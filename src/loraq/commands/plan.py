"""`loraq plan [RECIPE] [train flags]`: the predicted peak memory of that training run, before loading anything."""
from __future__ import annotations

import argparse
import json

from loraq.config import add_train_arguments, config_from_args

GB = 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="plan for this device (default: where training would run)")
    parser.add_argument("--memory", type=float, default=None, metavar="GB",
                        help="plan against this much memory instead of what is available here")
    parser.add_argument("--json", action="store_true", help="one JSON object (peak_bytes, breakdown, ...)")


def run(args: argparse.Namespace) -> int:
    from loraq.api.plan import plan

    device, memory, as_json = args.device, args.memory, args.json
    for name in ("device", "memory", "json"):
        delattr(args, name)
    result = plan(config_from_args(args), device=device, memory=None if memory is None else memory * GB)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result)
    return 0


def print_plan(p) -> None:
    rows = p.rows
    source = (f"the longest row of the data: {rows.longest} tokens" if rows.from_data
              else f"rows of --seq-len {rows.longest} tokens")
    print(f"model:     {p.model} ({p.shape.total_params / 1e6:.0f} M parameters), {p.method}, {p.dtype} on {p.device}")
    entries = f"{p.batch_size} prompts x {p.group} completions" if p.group > 1 else f"{p.batch_size}"
    print(f"batch:     {entries} x {rows.longest} tokens ({source})"
          + (", grad checkpointing" if "checkpointing" in " ".join(n for n, _ in p.estimate.terms) else ""))
    print(f"peak:      {p.peak_bytes / GB:.2f} GB ({p.estimate.phase})"
          + (f" x {p.processes} processes" if p.processes > 1 else ""))
    for name, size in p.estimate.terms:
        print(f"  {size / GB:8.3f} GB  {name}")
    print(f"other phases: loading {p.estimate.loading_bytes / GB:.2f} GB, "
          f"exact-match generation {p.estimate.generation_bytes / GB:.2f} GB")
    if p.available_bytes is None:
        print("available: unknown on this machine (give --memory GB)")
        return
    verdict = "fits" if p.fits else "does NOT fit"
    print(f"available: {p.available_bytes / GB:.1f} GB here: the run {verdict}")
    if p.max_batch_size is not None:
        capped = " (every row of the data)" if rows.from_data and p.max_batch_size * p.processes >= rows.rows else ""
        print(f"largest that fit (15% kept free): --batch-size {p.max_batch_size}{capped}"
              + (f", --seq-len {p.max_seq_len} (rows that long)" if p.max_seq_len else ""))
