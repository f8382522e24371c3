"""What the calibrated init's frozen fit costs per step and in memory, by its rank, side by side in one run.

    python bench/correction_rank.py [--ranks 16,64] [--steps 3] [--repeats 9]
    python bench/correction_rank.py --smoke      # a tiny random model, fit rank 4, in this process (bench/smoke.py)

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

import smoke  # noqa: E402
from throughput import BATCH, SEQ, docs_jsonl, loraq_train_cmd, run_timed  # noqa: E402


def settings(rank: int | None, calibration_samples: int | None = None) -> list[str]:
    """The flags of one configuration: None is the default init."""
    if rank is None:
        return []
    samples = [] if calibration_samples is None else ["--calibration-samples", str(calibration_samples)]
    return ["--init", "calibrated", "--correction-rank", str(rank), *samples]


def planned_bytes(model: Path, data: Path, rank: int | None, batch: int = BATCH, seq: int = SEQ) -> int:
    import loraq

    extra = {} if rank is None else {"init": "calibrated", "correction_rank": rank}
    return loraq.plan(model=str(model), data=str(data), method="qlora", batch_size=batch, seq_len=seq, packing=True,
                      dtype="bf16", eval_samples=0, device="cpu", **extra).peak_bytes


def step_seconds(model_dir: Path, data: Path, ranks: list[int | None], repeats: int, batch: int = BATCH,
                 seq: int = SEQ, calibration_rows: int = 256) -> list[float]:
    """Median seconds of one forward + backward (``batch`` x ``seq``, default 4 x 256) per configuration, timed in
    turns; the calibrated init fitted on ``calibration_rows`` rows of the text."""
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
    rows = [ids[i:i + seq] for i in range(0, calibration_rows * seq, seq)]
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
    ids = torch.tensor(rows[:batch])
    positions, mask = torch.arange(seq).expand(batch, seq), torch.ones(batch, seq, dtype=torch.long)

    def step(loss_module) -> float:
        t0 = time.perf_counter()
        out = loss_module(ids, ids, positions, mask, None)
        (out[0] if isinstance(out, tuple) else out).backward()
        return time.perf_counter() - t0

    times: list[list[float]] = [[] for _ in ranks]
    for loss_module in losses:
        step(loss_module)  # warm-up
    for _ in range(repeats):
        for i, loss_module in enumerate(losses):
            times[i].append(step(loss_module))
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="16,64", help="comma-separated ranks of the calibrated init's frozen fit")
    ap.add_argument("--steps", type=int, default=3, help="steps of each training run (its peak memory)")
    ap.add_argument("--repeats", type=int, default=9, help="timed forward + backward passes per configuration")
    smoke.add_flag(ap, "the training runs in this process, not fresh ones")
    args = ap.parse_args(argv)
    size = {"batch": BATCH, "seq": SEQ}
    if args.smoke:  # a tiny random model, fit rank 4, 1 step, 1 repeat, batch 2 x 32
        smoke.setup()
        args.ranks, args.steps, args.repeats, size = "4", 1, 1, {"batch": 2, "seq": 32}
        model, tmp = smoke.tiny_model(), smoke.temp_dir("loraq-corr-")
        data = docs_jsonl(tmp / "docs.jsonl", n_docs=4)
    else:
        from loraq.models.default import ensure_default_model

        model = ensure_default_model()
        tmp = Path(tempfile.mkdtemp(prefix="loraq-corr-"))
        data = docs_jsonl(tmp / "docs.jsonl")
    env = dict(os.environ, LORAQ_NO_HUB="1", HF_HUB_OFFLINE="1")
    configs = [None, *(int(r) for r in args.ranks.split(","))]
    rows = []
    for rank in configs:
        out = tmp / f"run-{rank}"
        flags = ["--max-steps", str(args.steps), "--packing", "--eval-every", "100000",
                 *settings(rank, 8 if args.smoke else None)]
        run_timed(loraq_train_cmd("qlora", model, data, out, *flags, **size), env, in_process=args.smoke)
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"correction_rank": rank, "peak_bytes": summary["peak_memory_bytes"],
                     "planned_bytes": planned_bytes(model, data, rank, **size)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    calibration_rows = 8 if args.smoke else 256
    for row, seconds in zip(rows, step_seconds(model, data, configs, args.repeats, calibration_rows=calibration_rows,
                                               **size)):
        row["step_seconds"] = seconds
    print_table(rows, args, size)


def print_table(rows: list[dict], args: argparse.Namespace, size: dict) -> None:
    base = rows[0]
    print(f"# {dt.datetime.now():%Y-%m-%d %H:%M} {platform.processor() or platform.machine()}, "
          f"QLoRA r=16, {size['batch']} x {size['seq']}, bf16; peak of a {args.steps}-step run; forward + backward, "
          f"median of {args.repeats} in turns{' -- SMOKE RUN, not a measurement' if args.smoke else ''}")
    print("| init | s / step | vs default | peak | vs default | plan / peak |\n|---|---|---|---|---|---|")
    for row in rows:
        name = "default" if row["correction_rank"] is None else f"calibrated, fit rank {row['correction_rank']}"
        print(f"| {name} | {row['step_seconds']:.2f} | x{row['step_seconds'] / base['step_seconds']:.2f} | "
              f"{row['peak_bytes'] / 1e9:.2f} GB | x{row['peak_bytes'] / base['peak_bytes']:.2f} | "
              f"{row['planned_bytes'] / row['peak_bytes']:.3f} |")


if __name__ == "__main__":
    main()
