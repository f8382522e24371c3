"""One epoch of variable-length chat data: loraq with packing against PEFT (+bitsandbytes) with HF-style padding.

The data is loraq's bundled demo set (2000 short chat examples, an order note
turned into a record). Both tools train one epoch of it with the same model,
method, rank, dtype and batch of 8 rows:

* loraq: ``loraq train --packing --seq-len 128`` (several examples per row,
  attention kept inside each example), and ``loraq train`` without packing for
  the share that packing alone contributes;
* PEFT: each batch padded to its longest example with an attention mask (what
  ``DataCollatorForSeq2Seq`` / TRL without packing do), ``bench/peft_run.py
  --padding --epoch``.

Reported: seconds of the training loop for the epoch (loading excluded, taken
from each tool's own clock), the whole process's wall time, peak RSS, and the
ratios against PEFT. The three processes run one after the other, once each
per ``--repeats``, alternating, and the median is kept.

    python bench/epoch.py [--method qlora|lora] [--repeats 1] [--model DIR]
    python bench/epoch.py --smoke      # 8 demo examples, a tiny random model, in this process (bench/smoke.py)
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import smoke  # noqa: E402
from throughput import ALPHA, RANK, loraq_train_cmd, peft_train_cmd, run_timed  # noqa: E402

BATCH, SEQ = 8, 128
SMOKE_EXAMPLES = 8


def loraq_cmd(method: str, model: Path, data: Path, out: Path, packing: bool) -> list[str]:
    return loraq_train_cmd(method, model, data, out, "--epochs", "1", *(["--packing"] if packing else []),
                           "--eval-every", "0", "--val-fraction", "0", batch=BATCH, seq=SEQ)


def peft_cmd(method: str, model: Path, data: Path) -> list[str]:
    return peft_train_cmd(method, model, data, "--epoch", "--padding", batch=BATCH, seq=SEQ)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="qlora", choices=("qlora", "lora"), help="QLoRA (PEFT+bitsandbytes) or LoRA")
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the three runs; the median is kept")
    ap.add_argument("--model", default=None, help="HF folder (default: loraq's default model)")
    ap.add_argument("--json", default=None, help="also write the results here")
    smoke.add_flag(ap, f"an epoch of {SMOKE_EXAMPLES} demo examples (one batch), the three runs in this process")
    return ap.parse_args(argv)


def one_run(name: str, args: argparse.Namespace, model: Path, data: Path, tmp: Path, env: dict) -> dict:
    """One of the three runs: training seconds, wall seconds, peak RSS, steps, tokens."""
    if name.startswith("loraq"):
        out = tmp / name.replace(" ", "-")
        wall, rss, _ = run_timed(loraq_cmd(args.method, model, data, out, packing="packed" in name), env,
                                 in_process=args.smoke)
        summary = json.loads((out / "summary.json").read_text())
        train_s, steps, tokens = summary["train_seconds"], summary["steps"], summary["tokens"]
    else:
        wall, rss, out_line = run_timed(peft_cmd(args.method, model, data), env, capture_stdout=True,
                                        in_process=args.smoke)
        res = json.loads(out_line.strip().splitlines()[-1])
        train_s, steps, tokens = res["seconds"], res["steps"], res["tokens"]
    print(f"  {name}: {steps} steps, {tokens} tokens, train {train_s:.1f} s, wall {wall:.1f} s, "
          f"peak RSS {rss / 2**30:.2f} GB", file=sys.stderr, flush=True)
    return {"train_seconds": train_s, "wall_seconds": wall, "peak_rss_bytes": rss, "steps": steps, "tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from loraq.data.demo import DEMO_DIR

    data = DEMO_DIR / "train.jsonl"
    if args.smoke:
        smoke.setup()
        model, tmp = smoke.tiny_model(), smoke.temp_dir("loraq-epoch-")
        data = smoke.head_jsonl(data, tmp / "train.jsonl", SMOKE_EXAMPLES)
    else:
        from loraq.models.default import ensure_default_model

        model = Path(args.model) if args.model else ensure_default_model()
        tmp = Path(tempfile.mkdtemp(prefix="loraq-epoch-"))
    env = dict(os.environ, LORAQ_NO_HUB="1", HF_HUB_OFFLINE="1")

    runs: dict[str, list[dict]] = {"loraq packed": [], "loraq padded": [], "peft padded": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(one_run(name, args, model, data, tmp, env))
    rows = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print_table(rows, args, model)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(dt.date.today()), "method": args.method, "rows": rows},
                                              indent=2))


def print_table(rows: dict[str, dict], args: argparse.Namespace, model: Path) -> None:
    ref = rows["peft padded"]
    print(f"\n# one epoch of the demo chat set -- {args.method} -- {dt.date.today()} -- "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{__import__('torch').__version__}{' -- SMOKE RUN, not a measurement' if args.smoke else ''}")
    examples = SMOKE_EXAMPLES if args.smoke else 2000
    print(f"model {model.name}, {examples} chat examples, batch {BATCH} rows, seq-len {SEQ}, "
          f"bf16, r={RANK}, alpha={ALPHA}, all-linear; median of {args.repeats}\n")
    print("| run | steps | epoch training time | speed vs PEFT | process wall | peak RSS | RSS vs PEFT |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        label = name + ("+bnb" if name.startswith("peft") and args.method == "qlora" else "")
        print(f"| {label} | {r['steps']:.0f} | {r['train_seconds']:.1f} s | "
              f"{ref['train_seconds'] / r['train_seconds']:.2f}x"
              f" | {r['wall_seconds']:.1f} s | {r['peak_rss_bytes'] / 2**30:.2f} GB | "
              f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
