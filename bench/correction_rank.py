"""What the calibrated init's frozen fit costs per step and in memory, by its rank, side by side in one run.

    python bench/correction_rank.py [--ranks 16,64] [--steps 3] [--repeats 9]

Trained the same way (bench/throughput.py's settings: SmolLM2-135M-Instruct,
Python's documentation as packed 4 x 256-token rows, bf16, r=16 all-linear):
QLoRA with the default init, then ``--init calibrated --correction-rank N``
for each N (the fit beside the rank-16 adapter). Each run once as a fresh
process for --steps steps: summary.json's peak memory, and ``loraq plan``'s
prediction for it. Speed: the three models built in this one process as
training builds them (4-bit loading, or the full-precision load, the fit and
the cast), then forward + backward of one batch timed in turns, model after
model, --repeats times, the median per model: a slow spell of the machine
hits all three (timing separate processes read 10-20% apart run to run
here). Ratios are to the default init's.
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


def step_seconds(model_dir: Path, data: Path, ranks: list[int | None], repeats: int) -> list[float]:
    """Median seconds of one forward + backward (batch 4 x 256) per configuration, timed in turns."""
    import statistics
    import time

    import torch

    from loraq.kernels import apply_fast_paths
    from loraq.lora.config import LoraConfig
    from loraq.lora.model import cast_frozen, inject_lora
    from loraq.models.load import load_model
    from loraq.training.objective import CausalLMLoss

    tokenizer = load_model(str(model_dir), method="lora", dtype="bf16").tokenizer
    text = "\n\n".join(json.loads(line)["text"] for line in data.read_text().splitlines())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i:i + SEQ] for i in range(0, 256 * SEQ, SEQ)]
    losses = []
    for rank in ranks:
        torch.manual_seed(0)
        if rank is None:
            model = load_model(str(model_dir), method="qlora", dtype="bf16").model
            apply_fast_paths(model)
            inject_lora(model, LoraConfig(r=16, alpha=32))
        else:
            model = load_model(str(model_dir), method="lora", dtype="fp32").model
            apply_fast_paths(model)
            quant = dict(quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.bfloat16)
            inject_lora(model, LoraConfig(r=16, alpha=32, init="calibrated", correction_rank=rank), quant=quant,
                        calibration=rows)
            cast_frozen(model, torch.bfloat16)
        model.train()
        losses.append(CausalLMLoss(model, None))
    batch = torch.tensor(rows[:BATCH])
    positions, mask = torch.arange(SEQ).expand(BATCH, SEQ), torch.ones(BATCH, SEQ, dtype=torch.long)

    def step(loss_module) -> float:
        t0 = time.perf_counter()
        out = loss_module(batch, batch, positions, mask, None)
        (out[0] if isinstance(out, tuple) else out).backward()
        return time.perf_counter() - t0

    times: list[list[float]] = [[] for _ in ranks]
    for loss_module in losses:
        step(loss_module)  # warm-up
    for _ in range(repeats):
        for i, loss_module in enumerate(losses):
            times[i].append(step(loss_module))
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    from loraq.models.default import ensure_default_model

    model = ensure_default_model()
    tmp = Path(tempfile.mkdtemp(prefix="loraq-corr-"))
    data = docs_jsonl(tmp / "docs.jsonl")
    env = dict(os.environ, LORAQ_NO_HUB="1", HF_HUB_OFFLINE="1")
    configs = [None, *(int(r) for r in args.ranks.split(","))]
    rows = []
    for rank in configs:
        out = tmp / f"run-{rank}"
        run_timed(loraq_train_cmd("qlora", model, data, out, "--max-steps", str(args.steps), "--packing",
                                  "--eval-every", "100000", *settings(rank)), env)
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"correction_rank": rank, "peak_bytes": summary["peak_memory_bytes"],
                     "planned_bytes": planned_bytes(model, data, rank)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for row, seconds in zip(rows, step_seconds(model, data, configs, args.repeats)):
        row["step_seconds"] = seconds
    base = rows[0]
    print(f"# {dt.datetime.now():%Y-%m-%d %H:%M} {platform.processor() or platform.machine()}, "
          f"QLoRA r=16, {BATCH} x {SEQ}, bf16; peak of a {args.steps}-step run; forward + backward, median of "
          f"{args.repeats} in turns")
    print("| init | s / step | vs default | peak | vs default | plan / peak |\n|---|---|---|---|---|---|")
    for row in rows:
        name = "default" if row["correction_rank"] is None else f"calibrated, fit rank {row['correction_rank']}"
        print(f"| {name} | {row['step_seconds']:.2f} | x{row['step_seconds'] / base['step_seconds']:.2f} | "
              f"{row['peak_bytes'] / 1e9:.2f} GB | x{row['peak_bytes'] / base['peak_bytes']:.2f} | "
              f"{row['planned_bytes'] / row['peak_bytes']:.3f} |")


if __name__ == "__main__":
    main()
