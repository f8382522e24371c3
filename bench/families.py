"""Training speed per model family with loraq's fast paths on and off, the two interleaved in ONE process.

For each family (``tests/family_configs.py``, here at hidden 512, 4 layers, 8 heads, 4 KV heads,
intermediate 1536, vocabulary 8192): two copies of the same random model with LoRA (r=16, all-linear) in
bf16 -- one as transformers builds it ("generic"), one after ``loraq.kernels.apply_fast_paths`` ("fast":
matmul attention, lean RMSNorm / gated activation where the family's classes are listed) -- step in turn
on the same random batches of 4 x 256 tokens (forward with transformers' own loss, backward, AdamW). A slow
spell of the shared machine hits both alike. Reported per family: the median step time of each after the
warm-up, the ratio, and which fast paths were on (the line ``loraq train`` prints).

    python bench/families.py [--families llama,gpt2] [--steps 8] [--warmup 2] [--hidden 512] [--layers 4]
    python bench/families.py --smoke     # llama and gpt2 at the tests' size, 2 x 32 tokens, 1 step after 1 warm-up
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE)]

import smoke  # noqa: E402
from family_configs import FAMILIES, TINY, family_config  # noqa: E402

BATCH, SEQ, RANK, ALPHA, VOCAB = 4, 256, 16, 32, 8192
SMOKE_SHAPE = 2, 32, 512  # batch, sequence, vocabulary of a smoke run


def build(family: str, size: dict, vocab: int = VOCAB):
    """(generic model, fast model, the fast-paths line, their optimizers): the same weights and adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraq.kernels import apply_fast_paths
    from loraq.lora.config import LoraConfig
    from loraq.lora.model import inject_lora

    torch.manual_seed(0)
    generic = AutoModelForCausalLM.from_config(family_config(family, vocab, size)).to(torch.bfloat16)
    fast = copy.deepcopy(generic)
    line = apply_fast_paths(fast).line()
    for model in (generic, fast):
        inject_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules=["all-linear"]),
                    generator=torch.Generator().manual_seed(0))
        model.train()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, foreach=False)
                  for m in (generic, fast)]
    return generic, fast, line, optimizers


def step(model, optimizer, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(family: str, size: dict, steps: int, warmup: int,
            shape: tuple[int, int, int] = (BATCH, SEQ, VOCAB)) -> dict:
    import torch

    batch, seq, vocab = shape
    generic, fast, line, (opt_generic, opt_fast) = build(family, size, vocab)
    g = torch.Generator().manual_seed(1)
    times = {"generic": [], "fast": []}
    for n in range(warmup + steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        pair = (("generic", generic, opt_generic), ("fast", fast, opt_fast))
        for name, model, optimizer in (pair if n % 2 == 0 else pair[::-1]):  # alternate who goes first
            seconds = step(model, optimizer, ids)
            if n >= warmup:
                times[name].append(seconds)
    generic_s, fast_s = statistics.median(times["generic"]), statistics.median(times["fast"])
    return {"family": family, "generic_s": generic_s, "fast_s": fast_s, "speedup": generic_s / fast_s,
            "tokens_per_second_fast": batch * seq / fast_s, "fast_paths": line}


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=None, help="comma-separated (default: all of tests/family_configs.py)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant, after the warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="steps per variant not timed")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (heads 8, KV heads 4, intermediate 3x)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--json", default=None, help="also write the results here")
    smoke.add_flag(ap, "llama and gpt2 (unless --families) at the tests' size")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = {"hidden": args.hidden, "layers": args.layers, "heads": 8, "kv_heads": 4, "intermediate": 3 * args.hidden}
    shape, families = (BATCH, SEQ, VOCAB), ",".join(FAMILIES)
    if args.smoke:
        smoke.setup()
        families, args.steps, args.warmup, size, shape = "llama,gpt2", 1, 1, dict(TINY), SMOKE_SHAPE
    print(f"# {dt.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"hidden {size['hidden']}, {size['layers']} layers, batch {shape[0]} x {shape[1]}, LoRA r={RANK} bf16"
          f"{' -- SMOKE RUN, not a measurement' if args.smoke else ''}", flush=True)
    print("| family | generic s/step | fast s/step | fast vs generic | fast paths |")
    print("|---|---|---|---|---|")
    rows = []
    for family in (args.families or families).split(","):
        row = measure(family, size, args.steps, args.warmup, shape)
        rows.append(row)
        print(f"| {family} | {row['generic_s']:.3f} | {row['fast_s']:.3f} | {row['speedup']:.2f}x | "
              f"{row['fast_paths'].removeprefix('fast paths: ')} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
