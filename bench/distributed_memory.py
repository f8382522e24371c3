"""Memory per rank: one process vs DDP vs FSDP2, for LoRA and QLoRA, measured and by formula.

Each configuration is a real ``loraq train`` run (3 steps of the demo set on
the default model unless --model is given); its summary.json reports, for
every rank, the peak resident memory and the memory held while training
(RSS at the end of the last step on CPU, allocated bytes on CUDA). A
separate process measures the baseline every rank pays before loading a
model (Python, torch, transformers, loraq imported).

Next to the measurement, the weight bytes each rank holds, counted from the
model itself: under DDP every rank holds everything; under FSDP2 the frozen
base (packed 4-bit weights, embeddings, norms, head) is split N ways while
the 4-bit statistics, the adapters, their gradients and AdamW state stay whole.

    python bench/distributed_memory.py                 # SmolLM2-135M, 2 ranks, gloo on CPU
    python bench/distributed_memory.py --nproc 4 --model DIR
    python bench/distributed_memory.py --smoke         # a tiny random model, the 1-process runs only, in this process
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

MB = 1e6
BASELINE = ("import torch, torch.distributed, transformers, transformers.models.llama.modeling_llama, "
            "loraq.training.loop; from loraq.training.metrics import current_rss_bytes; print(current_rss_bytes())")


def baseline_rss_bytes(in_process: bool = False) -> int:
    """RSS of a process that imported what every rank imports; ``in_process`` (smoke): this process's."""
    if in_process:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(BASELINE, {})
        return int(out.getvalue())
    return int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout)


def run(method: str, nproc: int, fsdp: bool, model: str | None, data: str, out: Path, threads: int,
        in_process: bool = False) -> dict:
    cmd = [sys.executable, "-m", "loraq", "train", "--method", method, "--data", data, "--max-steps", "3",
           "--batch-size", "2", "--seq-len", "256", "--dtype", "fp32", "--eval-samples", "0", "--output-dir", str(out),
           "--threads", str(threads), "--nproc", str(nproc)]
    if model:
        cmd += ["--model", model]
    if fsdp:
        cmd.append("--fsdp")
    if in_process:
        smoke.run_command(cmd)
    else:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def weight_bytes_per_rank(method: str, model_spec: str | None, nproc: int) -> dict[str, float]:
    """Bytes of weights and optimizer state one rank holds, by what FSDP2 shards and what it leaves whole."""
    import torch

    from loraq.lora.config import LoraConfig
    from loraq.lora.model import inject_lora
    from loraq.models.load import load_model
    from loraq.quant.linear import Linear4bit

    model = load_model(model_spec, method=method, dtype="fp32").model
    inject_lora(model, LoraConfig(r=16, alpha=32, target_modules=["all-linear"]))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    stats = sum(m.quant_state.nbytes for m in model.modules() if isinstance(m, Linear4bit))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    adapter_total = trainable * 4  # weights, gradients, AdamW exp_avg and exp_avg_sq
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    del model, torch
    return {"frozen": frozen, "quant_stats": stats, "adapter_with_grads_and_adam": adapter_total, "buffers": buffers,
            "ddp": frozen + stats + adapter_total + buffers,
            "fsdp": frozen / nproc + stats + adapter_total + buffers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from loraq's cache")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the DDP and FSDP2 runs")
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    smoke.add_flag(ap, "the 1-process runs only (DDP and FSDP2 start ranks as processes), in this process")
    args = ap.parse_args(argv)
    from loraq.data.demo import demo_paths

    data = str(demo_paths()[0])
    if args.smoke:
        smoke.setup()
        args.model = str(smoke.tiny_model())
        data = str(smoke.head_jsonl(demo_paths()[0], smoke.temp_dir("loraq-dist-") / "train.jsonl", 16))
    base = baseline_rss_bytes(in_process=args.smoke)
    print(f"baseline per process (imports, no model): {base / MB:.0f} MB")
    runs = [("1 process", 1, False)]
    if not args.smoke:
        runs += [(f"DDP x{args.nproc}", args.nproc, False), (f"FSDP2 x{args.nproc}", args.nproc, True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "qlora"):
            counted = weight_bytes_per_rank(method, args.model, args.nproc)
            for label, nproc, fsdp in runs:
                s = run(method, nproc, fsdp, args.model, data, Path(tmp) / f"{method}-{nproc}-{fsdp}", args.threads,
                        in_process=args.smoke)
                peak = max(s["peak_memory_bytes_per_rank"])
                held = max(s["training_memory_bytes_per_rank"])
                weights = counted["fsdp"] if fsdp else counted["ddp"]
                rows.append((method, label, peak / MB, (peak - base) / MB, held / MB, (held - base) / MB, weights / MB))
            print(f"{method}: frozen {counted['frozen'] / MB:.1f} MB, "
                  f"4-bit stats {counted['quant_stats'] / MB:.1f} MB, "
                  f"adapters+grads+AdamW {counted['adapter_with_grads_and_adam'] / MB:.1f} MB, "
                  f"buffers {counted['buffers'] / MB:.1f} MB")
    print_table(rows)
    return 0


def print_table(rows: list[tuple]) -> None:
    print("\n| method | run | peak RSS / rank | minus baseline | RSS while training / rank | minus baseline "
          "| weights+optimizer / rank (counted) |")
    print("|---|---|---|---|---|---|---|")
    for method, label, peak, peak_net, held, held_net, weights in rows:
        print(f"| {method} | {label} | {peak:.0f} MB | {peak_net:.0f} MB | {held:.0f} MB | {held_net:.0f} MB "
              f"| {weights:.0f} MB |")


if __name__ == "__main__":
    raise SystemExit(main())
