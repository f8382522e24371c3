"""A GRPO step against an SFT step on the same number of tokens: peak RSS, step time, and where GRPO's time goes
(issue 31).

Two runs on SmolLM2-135M-Instruct, QLoRA (NF4 + double quantization, r=16, alpha 32, all linear layers), each a
process of its own (peak RSS is per process), ``--steps`` steps:

* ``grpo``: ``loraq train grpo-demo`` (the bundled sums, 2 prompts x 8 completions of up to 16 tokens a step;
  no held-out evaluation);
* ``sft``: ``loraq train`` on chat examples made of the same prompts with answers of the length GRPO's
  completions had on average, ``--batch-size`` 16: the rows a GRPO step trains on, with their tokens.

Reported: each run's peak RSS (the process's, loading included) and median step time (from metrics.jsonl's
``elapsed``, steps 2..N), the ratio of the peaks, and GRPO's mean ``time/generation_share``,
``time/scoring_share`` and ``time/training_share``.

    python bench/grpo.py [--steps 6]
    python bench/grpo.py --smoke      # a tiny random model, 1 step of each, in this process
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import smoke  # noqa: E402


def sft_file(path: Path, answer_tokens: int, n: int = 150) -> Path:
    """The demo's prompts as chat examples whose answers run about ``answer_tokens`` tokens."""
    from loraq.data.grpo_demo import generate

    train, _ = generate()
    words = " ".join(["one"] * max(1, answer_tokens - 2))
    with open(path, "w") as f:
        for record in train[:n]:
            messages = record["prompt"] + [{"role": "assistant", "content": f"{record['answer']} {words}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def run(args: list[str]) -> dict:
    """``loraq train`` in a process of its own; its summary and metrics lines."""
    out = Path(tempfile.mkdtemp(prefix="loraq-bench-grpo-")) / "run"
    subprocess.run([sys.executable, "-m", "loraq", "train", *args, "--output-dir", str(out), "--eval-samples", "0",
                    "--save-every", "0"], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "steps": [x for x in lines if x["kind"] == "train"]}


def step_seconds(steps: list[dict]) -> float:
    times = [b["elapsed"] - a["elapsed"] for a, b in zip(steps, steps[1:])]
    return statistics.median(times) if times else float("nan")


def report(grpo: dict, sft: dict) -> None:
    g, s = grpo["summary"], sft["summary"]
    later = grpo["steps"][1:] or grpo["steps"]
    shares = {k: statistics.mean(x[f"time/{k}_share"] for x in later) for k in ("generation", "scoring", "training")}
    from decode import machine

    info = machine()
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(f"grpo: peak RSS {g['peak_memory_bytes'] / 2**30:.2f} GB, step {step_seconds(grpo['steps']):.1f} s, "
          f"{g['tokens'] / max(1, len(grpo['steps'])):.0f} tokens a step")
    print(f"sft:  peak RSS {s['peak_memory_bytes'] / 2**30:.2f} GB, step {step_seconds(sft['steps']):.1f} s, "
          f"{s['tokens'] / max(1, len(sft['steps'])):.0f} tokens a step")
    print(f"peak RSS grpo / sft: {g['peak_memory_bytes'] / s['peak_memory_bytes']:.2f}x (target <= 1.5x)")
    print("grpo step time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
          + " (target: generation <= 70%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    smoke.add_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke_run()
    grpo = run(["grpo-demo", "--max-steps", str(args.steps)])
    answer = round(statistics.mean(x["completions/mean_length"] for x in grpo["steps"]))
    data = sft_file(Path(tempfile.mkdtemp(prefix="loraq-bench-grpo-")) / "sft.jsonl", answer)
    sft = run(["--data", str(data), "--batch-size", "16", "--seq-len", "128", "--max-steps", str(args.steps),
               "--lr", "1e-4"])
    report(grpo, sft)
    return 0


def smoke_run() -> int:
    """Both runs on the tiny model, one step each, in this process (a plain prompt file: it has no template
    worth the demo's)."""
    import loraq

    model = smoke.tiny_model()
    folder = smoke.temp_dir("loraq-grpo-smoke-")
    prompts = folder / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n" for i in range(4)))
    common = dict(model=str(model), method="lora", dtype="fp32", max_steps=1, eval_samples=0, seq_len=64)
    grpo = loraq.train(data=str(prompts), objective="grpo", reward=["exact_answer", "length:4"], num_generations=2,
                       batch_size=2, max_completion_length=4, output_dir=str(folder / "grpo"), **common)
    sft = loraq.train(data=str(sft_file(folder / "sft.jsonl", 4, n=4)), batch_size=4, output_dir=str(folder / "sft"),
                      **common)
    runs = [{"summary": r.summary, "steps": [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text()
                                             .splitlines()]} for r in (grpo, sft)]
    report(*runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
