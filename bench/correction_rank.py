"""What the calibrated init's frozen fit costs per step and in memory, by its rank, side by side in one run.

    python bench/correction_rank.py [--ranks 16,64] [--short 3] [--long 13]

Trained the same way (bench/throughput.py's settings: SmolLM2-135M-Instruct,
Python's documentation as packed 4 x 256-token rows, bf16, r=16 all-linear):
QLoRA with the default init, then ``--init calibrated --correction-rank N``
for each N (the fit beside the rank-16 adapter). Each run twice as a fresh
process, for --short and --long steps: the time per step is the difference of
the two runs' training-loop seconds (summary.json's ``train_seconds``) over
the difference of steps, so the first steps' warm-up cancels (wall times do
not serve: loading, calibration and the fit vary by tens of seconds from run
to run). Memory: summary.json's peak of the long run, and ``loraq plan``'s
prediction for it. Ratios are to the default init's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import BATCH, SEQ, docs_jsonl, loraq_train_cmd, run_timed  # noqa: E402


def settings(rank: int | None) -> list[str]:
    """The flags of one configuration: None is the default init."""
    return [] if rank is None else ["--init", "calibrated", "--correction-rank", str(rank)]


def planned_bytes(model: Path, data: Path, rank: int | None) -> int:
    import loraq

    extra = {} if rank is None else {"init": "calibrated", "correction_rank": rank}
    return loraq.plan(model=str(model), data=str(data), method="qlora", batch_size=BATCH, seq_len=SEQ, packing=True,
                      dtype="bf16", eval_samples=0, device="cpu", **extra).peak_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--short", type=int, default=3)
    ap.add_argument("--long", type=int, default=13)
    args = ap.parse_args()

    from loraq.models.default import ensure_default_model

    model = ensure_default_model()
    tmp = Path(tempfile.mkdtemp(prefix="loraq-corr-"))
    data = docs_jsonl(tmp / "docs.jsonl")
    env = dict(os.environ, LORAQ_NO_HUB="1", HF_HUB_OFFLINE="1")
    configs = [None, *(int(r) for r in args.ranks.split(","))]
    rows = []
    for rank in configs:
        out, loop, summary = tmp / f"run-{rank}", {}, {}
        for steps in (args.short, args.long):
            cmd = loraq_train_cmd("qlora", model, data, out, "--max-steps", str(steps), "--packing",
                                  "--eval-every", "100000", *settings(rank))
            run_timed(cmd, env)
            summary = json.loads((out / "summary.json").read_text())
            loop[steps] = summary["train_seconds"]
        rows.append({"correction_rank": rank, "step_seconds": (loop[args.long] - loop[args.short])
                     / (args.long - args.short), "peak_bytes": summary["peak_memory_bytes"],
                     "planned_bytes": planned_bytes(model, data, rank)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]
    print(f"# {dt.datetime.now():%Y-%m-%d %H:%M} {platform.processor() or platform.machine()}, "
          f"QLoRA r=16, {BATCH} x {SEQ} packed, bf16; steps {args.short} and {args.long}")
    print("| init | s / step | vs default | peak | vs default | plan / peak |\n|---|---|---|---|---|---|")
    for row in rows:
        name = "default" if row["correction_rank"] is None else f"calibrated, fit rank {row['correction_rank']}"
        print(f"| {name} | {row['step_seconds']:.2f} | x{row['step_seconds'] / base['step_seconds']:.2f} | "
              f"{row['peak_bytes'] / 1e9:.2f} GB | x{row['peak_bytes'] / base['peak_bytes']:.2f} | "
              f"{row['planned_bytes'] / row['peak_bytes']:.3f} |")


if __name__ == "__main__":
    main()
