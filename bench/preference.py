"""DPO against SFT on the same rows, and against TRL's DPOTrainer with PEFT + bitsandbytes (issue 21).

Three runs on SmolLM2-135M-Instruct, QLoRA (NF4 + double quantization,
blocksize 64, bf16 compute), r=16, alpha 32, all linear layers, AdamW,
the bundled preference demo (``--pairs`` training pairs, seq-len 128):

* ``sft``: ``loraq train`` on the pairs' rows as supervised chat examples
  (each pair -> (prompt, chosen) and (prompt, rejected); the answers are the
  trained tokens), ``--batch-size`` 2 x pairs-per-step rows: the same rows a
  DPO step sees;
* ``dpo``: ``loraq train --objective dpo``, ``--batch-size`` pairs per step
  (the reference is scored before the first step and not timed);
* ``trl``: TRL's DPOTrainer on the same pairs and batch, PEFT's LoRA on
  transformers' bitsandbytes 4-bit model (its default: the reference forward
  with the adapter off inside every step).

Each run is a process of its own (peak RSS is per process): after
``--warmup`` steps the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), then ``--steps`` steps are timed one by one.
Reported per run: median step time, tokens per second (non-padding tokens
of both answers' rows, counted the same way for all three) and the peak RSS
over the timed steps. The runs alternate (sft, dpo, trl) for ``--rounds``
rounds; ratios are taken per round, so a slow spell of the shared VM hits
whole rounds, not one tool.

    python bench/preference.py [--rounds 2] [--steps 10] [--warmup 2] [--pairs-per-step 8]
    python bench/preference.py --only dpo --steps 2 --warmup 1     # a quick check
    python bench/preference.py --smoke      # 4 pairs, a tiny random model, 1 step of each, all in this process
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import smoke  # noqa: E402

SEQ, RANK, ALPHA, LR = 128, 16, 32, 5e-4


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError:  # not allowed here: the peak is then the process's
        pass


class Timer:
    """Step times after the warmup, and the peak RSS since the warmup ended."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.t0 = warmup, [], 0.0

    def start(self, step: int) -> None:
        if step == self.warmup + 1:
            reset_peak_rss()
        self.t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


def pair_records(n: int) -> list[dict]:
    from loraq.data.preference_demo import demo_paths

    lines = demo_paths()[0].read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def tokens_per_pair(records: list[dict], model: str | None = None) -> float:
    """Mean non-padding tokens of a pair's two rows (loraq's rendering; TRL's differs by a newline per row)."""
    from loraq.config import TrainConfig
    from loraq.data.preference import build_preference_data
    from loraq.models.load import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        data = build_preference_data(TrainConfig(data=str(path), seq_len=SEQ, eval_samples=0), load_tokenizer(model))
    return sum(len(p) for p in data.train) / len(data.train)


def run_loraq(mode: str, records: list[dict], pairs_per_step: int, steps: int, warmup: int, tmp: Path,
              model: str | None = None) -> dict:
    import loraq
    from loraq.training.hooks import Callback

    timer = Timer(warmup)

    class Timed(Callback):
        def on_step_start(self, step):
            timer.start(step)

        def on_step_end(self, step, result):
            timer.end(step)

    data = tmp / f"{mode}.jsonl"
    if mode == "sft":
        rows = [{"messages": r["prompt"] + r[side]} for r in records for side in ("chosen", "rejected")]
        settings = {"batch_size": 2 * pairs_per_step}
    else:
        rows, settings = records, {"batch_size": pairs_per_step, "objective": "dpo", "beta": 0.1}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loraq.train(data=str(data), model=model, method="qlora", dtype="bf16", rank=RANK, alpha=ALPHA, seq_len=SEQ, lr=LR,
                max_steps=warmup + steps, warmup=0, eval_samples=0, output_dir=str(tmp / f"run-{mode}"),
                callbacks=[Timed()], **settings)
    return {"times": timer.times, "peak_rss_bytes": peak_rss_bytes()}


def run_trl(records: list[dict], pairs_per_step: int, steps: int, warmup: int, tmp: Path,
            model_dir: str | None = None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from loraq.models.default import ensure_default_model

    folder = model_dir or str(ensure_default_model(progress=False))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16)
    timer = Timer(warmup)

    class Timed(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.start(state.global_step + 1)

        def on_step_end(self, args, state, control, **kw):
            timer.end(state.global_step)

    args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=pairs_per_step, beta=0.1,
                     learning_rate=LR, max_steps=warmup + steps, max_length=SEQ, bf16=True, use_cpu=True,
                     report_to=[], logging_steps=1000, save_strategy="no", lr_scheduler_type="constant")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[Timed()],
                         peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                lora_dropout=0.0))
    trainer.train()
    return {"times": timer.times, "peak_rss_bytes": peak_rss_bytes()}


def one_run(mode: str, args) -> dict:
    records = pair_records(args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "trl":
            return run_trl(records, args.pairs_per_step, args.steps, args.warmup, Path(tmp), args.model)
        return run_loraq(mode, records, args.pairs_per_step, args.steps, args.warmup, Path(tmp), args.model)


def summarize(result: dict, tokens_per_step: float) -> dict:
    median = statistics.median(result["times"])
    return {"step_seconds": median, "tokens_per_second": tokens_per_step / median,
            "peak_rss_gb": result["peak_rss_bytes"] / 1e9}


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """:func:`one_run` in a process of its own (a smoke run: in this one)."""
    if args.smoke:
        return one_run(mode, args)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", mode, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--pairs-per-step", str(args.pairs_per_step), "--pairs", str(args.pairs),
           *(["--model", args.model] if args.model else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the three runs")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run before the timing")
    parser.add_argument("--pairs-per-step", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--pairs", type=int, default=200, help="training pairs taken from the demo")
    parser.add_argument("--model", default=None, help="HF folder (default: loraq's default model)")
    parser.add_argument("--only", default=None, help="one mode (sft, dpo, trl) in this process, printed as JSON")
    smoke.add_flag(parser, "4 pairs, 2 per step, 1 step, no warm-up; the three runs in this process")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke.setup()
        args.model, args.rounds, args.steps, args.warmup = str(smoke.tiny_model()), 1, 1, 0
        args.pairs, args.pairs_per_step = 4, 2
    if args.only:
        print("RESULT " + json.dumps(one_run(args.only, args)), flush=True)
        return
    tokens_per_step = tokens_per_pair(pair_records(args.pairs), args.model) * args.pairs_per_step
    rounds = []
    for r in range(args.rounds):
        row = {}
        for mode in ("sft", "dpo", "trl"):
            row[mode] = summarize(run_mode(mode, args), tokens_per_step)
            print(f"round {r + 1} {mode}: {json.dumps(row[mode])}", flush=True)
        row["dpo_time_per_token_vs_sft"] = row["dpo"]["step_seconds"] / row["sft"]["step_seconds"]
        row["dpo_rss_vs_sft"] = row["dpo"]["peak_rss_gb"] / row["sft"]["peak_rss_gb"]
        row["dpo_speed_vs_trl"] = row["trl"]["step_seconds"] / row["dpo"]["step_seconds"]
        row["dpo_rss_vs_trl"] = row["dpo"]["peak_rss_gb"] / row["trl"]["peak_rss_gb"]
        rounds.append(row)
        print(f"round {r + 1}: " + json.dumps({k: v for k, v in row.items() if k.startswith("dpo_")}), flush=True)
    print(json.dumps({"tokens_per_step": tokens_per_step, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
