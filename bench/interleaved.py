"""Training speed of loraq and PEFT (+bitsandbytes) with their steps interleaved in ONE process.

Why a second method beside ``bench/throughput.py``: that one times each tool
in processes of its own (the issue's method: a 13-step run minus a 3-step
run), and on this shared VM a slow spell of 10-20% lands on whichever
process is running, so a single run's ratio moves by +-0.15. Here loraq's
training loop runs as ``loraq train`` would, and just before each of its
steps one PEFT step runs (``bench/peft_run.py``'s model, optimizer and step,
on loraq's batch of the same position in the same packed data): a slow
spell hits both tools alike. Reported: the median step time of each after
``--warmup`` steps, their ratio, and the spread of the ratios of adjacent
(PEFT, loraq) pairs.

loraq's step is timed from the end of the PEFT step before it to the end of
its own (a training callback, ``loraq.training.hooks``): its forward,
backward, optimizer step and logging. Memory is
not measured here (both models live in this process; throughput.py measures
each tool's peak RSS alone). Settings as throughput.py: text packed into
4 x 256, bf16, r=16, alpha 32, dropout 0, all-linear, AdamW, seed 0.

    python bench/interleaved.py [--methods qlora,lora] [--steps 20] [--warmup 3]
    python bench/interleaved.py --smoke      # QLoRA on a tiny random model, 1 step after 1 warm-up (bench/smoke.py)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smoke  # noqa: E402
from throughput import ALPHA, BATCH, RANK, SEQ, docs_jsonl  # noqa: E402


def measure(method: str, steps: int, model_dir: Path, data: Path, out: Path) -> dict[str, list[float]]:
    """Step times of both tools, alternating: PEFT step n, then loraq step n, for n in 1..steps."""
    import torch

    from loraq.api.train import train
    from loraq.training.hooks import Callback
    from peft_run import build, load_batches, step

    torch.manual_seed(0)
    model, opt, tok = build(method, str(model_dir), RANK, ALPHA)
    batches = load_batches(tok, str(data), SEQ, BATCH)
    times: dict[str, list[float]] = {"peft": [], "loraq": []}

    class PeftFirst(Callback):
        """Before each loraq step, one PEFT step; loraq's step is timed from there to its end."""

        def on_step_start(self, n: int) -> None:
            start = time.perf_counter()
            step(model, opt, batches[(n - 1) % len(batches)])
            self.peft_done = time.perf_counter()
            times["peft"].append(self.peft_done - start)

        def on_step_end(self, n: int, result) -> None:
            times["loraq"].append(time.perf_counter() - self.peft_done)

    train(model=str(model_dir), data=str(data), method=method, max_steps=steps, batch_size=BATCH,
          seq_len=SEQ, rank=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear", dtype="bf16",
          packing=True, eval_every=100000, save_every=100000, eval_samples=0, seed=0, output_dir=str(out),
          overwrite=True, callbacks=[PeftFirst()])
    return times


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="qlora,lora", help="comma-separated: qlora, lora")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per tool, after the warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each tool not counted")
    ap.add_argument("--model", default=None, help="HF folder (default: loraq's default model)")
    ap.add_argument("--json", default=None, help="also write the results here")
    smoke.add_flag(ap, "QLoRA only, 1 step after 1 warm-up")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LORAQ_NO_HUB", "1")
    if args.smoke:
        smoke.setup()
        args.methods, args.steps, args.warmup = "qlora", 1, 1
        model, tmp = smoke.tiny_model(), smoke.temp_dir("loraq-interleaved-")
        data = docs_jsonl(tmp / "docs.jsonl", n_docs=6)
    else:
        from loraq.models.default import ensure_default_model

        model = Path(args.model) if args.model else ensure_default_model()
        tmp = Path(tempfile.mkdtemp(prefix="loraq-interleaved-"))
        data = docs_jsonl(tmp / "docs.jsonl")
    results = []
    for method in args.methods.split(","):
        times = measure(method, args.warmup + args.steps, model, data, tmp / f"run-{method}")
        peft, ours = times["peft"][args.warmup:], times["loraq"][args.warmup:]
        pairs = sorted(p / q for p, q in zip(peft, ours))
        results.append({"method": method, "peft_seconds": peft, "loraq_seconds": ours,
                        "peft_median": statistics.median(peft), "loraq_median": statistics.median(ours),
                        "speedup": statistics.median(peft) / statistics.median(ours),
                        "pair_ratios": pairs})
        print(f"  {method}: loraq {statistics.median(ours):.3f} s, PEFT {statistics.median(peft):.3f} s per step",
              file=sys.stderr, flush=True)
    print_table(results, args, model)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(dt.date.today()), "results": results}, indent=2))


def print_table(results: list[dict], args: argparse.Namespace, model: Path) -> None:
    import torch

    print(f"\n# loraq vs PEFT(+bitsandbytes), steps interleaved in one process -- {dt.date.today()} -- "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}{' -- SMOKE RUN, not a measurement' if args.smoke else ''}")
    print(f"model {model.name}, batch {BATCH} x {SEQ} packed text, bf16, r={RANK}, alpha={ALPHA}, all-linear; "
          f"median of {args.steps} steps per tool after {args.warmup} warm-up steps\n")
    print("| method | loraq s/step | PEFT s/step | loraq tokens/s | PEFT tokens/s | speed vs PEFT "
          "| adjacent pairs: 10th / 50th / 90th percentile |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        p = r["pair_ratios"]
        pct = [p[min(len(p) - 1, int(q * len(p)))] for q in (0.1, 0.5, 0.9)]
        peft_name = "PEFT+bnb" if r["method"] == "qlora" else "PEFT"
        print(f"| {r['method']} | {r['loraq_median']:.3f} | {r['peft_median']:.3f} | "
              f"{BATCH * SEQ / r['loraq_median']:.0f} | {BATCH * SEQ / r['peft_median']:.0f} | "
              f"**{r['speedup']:.2f}x** | {pct[0]:.2f} / {pct[1]:.2f} / {pct[2]:.2f} ({peft_name} / loraq) |")


if __name__ == "__main__":
    main()
