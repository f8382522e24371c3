"""Training throughput and memory: loraq against PEFT (+bitsandbytes), side by side, in one run.

For each tool and method the same training is run twice as a fresh process,
for N_SHORT and N_LONG optimizer steps; the time per step is the difference
of the two wall times divided by the difference of steps, so loading and
start-up cancel out. Peak RSS is the larger of the two processes' (os.wait4).
Runs alternate between the tools so a slow spell of the machine hits both.

Settings (issue 6): text data (Python's own documentation, pydoc_data.topics)
packed into batches of 4 x 256 tokens, bf16, LoRA r=16, alpha=32,
dropout 0, all linear layers but the head, AdamW, seed 0.

MFU = model FLOPs per token x tokens/s / the bf16 matmul peak measured in the
same run (torch.matmul 2048 x 2048). Model FLOPs per token for LoRA/QLoRA:
4 x (parameters in matmuls, head included) for the forward and the input
gradient, plus attention (4 x layers x hidden x mean context, x3 for backward).

    python bench/throughput.py [--methods qlora,lora] [--short 3] [--long 13] [--model DIR]
    python bench/throughput.py --smoke      # QLoRA on a tiny random model, 1 and 2 steps, in this process
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PY = sys.executable
import smoke  # noqa: E402

BATCH, SEQ, RANK, ALPHA = 4, 256, 16, 32


def docs_jsonl(path: Path, n_docs: int = 400) -> Path:
    """Python's bundled documentation topics as a `text` dataset (license: PSF, shipped with CPython)."""
    from pydoc_data.topics import topics

    with open(path, "w") as fh:
        for key in sorted(topics)[:n_docs]:
            fh.write(json.dumps({"text": topics[key]}) + "\n")
    return path


def matmul_peak_gflops(dtype_name: str = "bf16", n: int = 2048, reps: int = 10) -> float:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n ** 3 / best / 1e9


def model_flops_per_token(model_dir: Path, seq_len: int = SEQ) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    d, L, ff, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ff
    matmul_params = L * per_layer + V * d
    attention = 3 * 4 * L * heads * hd * (seq_len / 2)
    return 4 * matmul_params + attention


def run_timed(cmd: list[str], env: dict | None = None, capture_stdout: bool = False,
              in_process: bool = False) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes, and stderr tail (or all of stdout, if asked) of one fresh process.
    ``in_process`` (smoke runs): the command runs in this process (:func:`smoke.run_command`), no fresh one."""
    if in_process:
        from smoke import run_command

        return run_command(cmd, env, capture_stdout)
    with tempfile.TemporaryFile("w+") as err_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                                stderr=err_file, env=env, text=True)
        out = proc.stdout.read() if capture_stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: ru_maxrss is this child's peak
        wall = time.perf_counter() - t0
        err_file.seek(0)
        err = err_file.read()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({code}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024, out if capture_stdout else err[-500:]


def loraq_train_cmd(method: str, model: Path, data: Path, out: Path, *extra: str, batch: int = BATCH,
                    seq: int = SEQ) -> list[str]:
    """``loraq train`` with the settings both tools share (r, alpha, dropout 0, all-linear, bf16, no saving)."""
    return [PY, "-m", "loraq", "train", "--model", str(model), "--data", str(data), "--method", method,
            "--batch-size", str(batch), "--seq-len", str(seq), "--rank", str(RANK), "--alpha", str(ALPHA),
            "--dropout", "0", "--target-modules", "all-linear", "--dtype", "bf16", "--save-every", "100000",
            "--eval-samples", "0", "--seed", "0", "--output-dir", str(out), "--overwrite", *extra]


def peft_train_cmd(method: str, model: Path, data: Path, *extra: str, batch: int = BATCH,
                   seq: int = SEQ) -> list[str]:
    """The same training through transformers + PEFT (+ bitsandbytes): ``bench/peft_run.py``."""
    return [PY, str(HERE / "peft_run.py"), "--method", method, "--model", str(model), "--data", str(data),
            "--batch-size", str(batch), "--seq-len", str(seq), "--rank", str(RANK), "--alpha", str(ALPHA), *extra]


def loraq_cmd(method: str, steps: int, model: Path, data: Path, out: Path, gc: bool = False) -> list[str]:
    return loraq_train_cmd(method, model, data, out, "--max-steps", str(steps), "--packing", "--eval-every", "100000",
                           *(["--grad-checkpointing"] if gc else []))


def peft_cmd(method: str, steps: int, model: Path, data: Path) -> list[str]:
    return peft_train_cmd(method, model, data, "--steps", str(steps))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="qlora,lora", help="comma-separated: qlora, lora")
    ap.add_argument("--short", type=int, default=3, help="steps of the short run")
    ap.add_argument("--long", type=int, default=13, help="steps of the long run")
    ap.add_argument("--model", default=None, help="HF folder (default: loraq's default model)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--repeats", type=int, default=1,
                    help="repeat the whole alternation; per-step times are the median over repeats")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="also run loraq with --grad-checkpointing (its speed and memory cost)")
    smoke.add_flag(ap, "QLoRA only; both tools' runs in this process, not fresh ones")
    return ap.parse_args(argv)


def measure(method: str, args: argparse.Namespace, model: Path, data: Path, tmp: Path, env: dict) -> list[dict]:
    """One row per tool: seconds per step (long minus short run), peak RSS."""
    tools = ("loraq", "peft", *(["loraq+gc"] if args.grad_checkpointing else []))
    res: dict[str, list] = {tool: [] for tool in tools}
    for _ in range(args.repeats):
        walls: dict[str, dict] = {tool: {} for tool in tools}
        for steps in (args.short, args.long):  # alternate tools at each length
            for tool in tools:
                cmd = (peft_cmd(method, steps, model, data) if tool == "peft"
                       else loraq_cmd(method, steps, model, data, tmp / f"run-{method}", gc=tool == "loraq+gc"))
                wall, rss, _ = run_timed(cmd, env, in_process=args.smoke)
                walls[tool][steps] = (wall, rss)
                print(f"  {method:5s} {tool:8s} {steps:3d} steps: {wall:7.1f} s, peak RSS {rss / 2**30:.2f} GB",
                      file=sys.stderr, flush=True)
        for tool in tools:
            (w_s, r_s), (w_l, r_l) = walls[tool][args.short], walls[tool][args.long]
            res[tool].append(((w_l - w_s) / (args.long - args.short), max(r_s, r_l)))
    rows = []
    for tool in tools:
        each = [t for t, _ in res[tool]]
        sec_per_step = statistics.median(each)
        rows.append({"method": method, "tool": tool, "seconds_per_step": sec_per_step,
                     "tokens_per_second": BATCH * SEQ / sec_per_step, "seconds_per_step_each": each,
                     "peak_rss_bytes": max(r for _, r in res[tool])})
    return rows


def print_table(args: argparse.Namespace, rows: list[dict], model: Path, peak: float, flops: float) -> None:
    print(f"\n# loraq vs PEFT{'+bitsandbytes' if 'qlora' in args.methods else ''} -- {dt.date.today()} -- "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{__import__('torch').__version__}{' -- SMOKE RUN, not a measurement' if args.smoke else ''}")
    print(f"model {model.name}, batch {BATCH} x {SEQ} packed text, bf16, r={RANK}, alpha={ALPHA}, all-linear; "
          f"bf16 matmul peak measured {peak:.0f} GFLOP/s; {flops / 1e9:.3f} GFLOP/token; "
          f"median of {args.repeats}\n")
    print("| method | tool | tokens/s | peak RSS | MFU | speed vs PEFT | RSS vs PEFT |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        ref = next(r for r in rows if r["method"] == method and r["tool"] == "peft")
        ours = [r for r in rows if r["method"] == method and r["tool"] != "peft"]
        for r in (*ours, ref):
            ratio_speed = r["tokens_per_second"] / ref["tokens_per_second"]
            ratio_rss = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
            print(f"| {method} | {r['tool']}{'+bnb' if r['tool'] == 'peft' and method == 'qlora' else ''} | "
                  f"{r['tokens_per_second']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} GB | {100 * r['mfu']:.0f}% | "
                  f"{ratio_speed:.2f}x | {ratio_rss:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:  # QLoRA on a tiny random model, 1 and 2 steps of each tool in this process, a small matmul
        smoke.setup()
        args.methods, args.short, args.long, args.repeats = "qlora", 1, 2, 1
        model, tmp = smoke.tiny_model(), smoke.temp_dir("loraq-bench-")
        data = docs_jsonl(tmp / "docs.jsonl", n_docs=6)
        peak = matmul_peak_gflops("bf16", n=128, reps=1)
    else:
        from loraq.models.default import ensure_default_model

        model = Path(args.model) if args.model else ensure_default_model()
        tmp = Path(tempfile.mkdtemp(prefix="loraq-bench-"))
        data = docs_jsonl(tmp / "docs.jsonl")
        peak = matmul_peak_gflops("bf16")
    flops = model_flops_per_token(model)
    env = dict(os.environ, LORAQ_NO_HUB="1", HF_HUB_OFFLINE="1")
    rows = [row for method in args.methods.split(",") for row in measure(method, args, model, data, tmp, env)]
    for row in rows:
        row["mfu"] = flops * row["tokens_per_second"] / (peak * 1e9)
    print_table(args, rows, model, peak, flops)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(dt.date.today()), "peak_gflops": peak,
                                               "flops_per_token": flops, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
