"""`loraq train [RECIPE.yaml] [--flags]`: fine-tune, evaluate, checkpoint, resume."""
from __future__ import annotations

import argparse
import os

from loraq.config import add_train_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loraq.api.train import apply_demo_defaults, train

    cfg = config_from_args(args)
    demo = cfg.data is None
    cfg = apply_demo_defaults(cfg).validate()
    if demo and reports_here():
        print(f"loraq: no --data given: running {demo_description(cfg.objective, args.recipe)}", flush=True)
    result = train(cfg)
    if reports_here():
        print_report(result.summary, result.run_dir)
    return 0


def demo_description(objective: str, recipe: str | None) -> str:
    """What a run without --data trains on, and the recipe that says how (the one given, else the demo's)."""
    data = {"sft": "QLoRA on the bundled demo set", "grpo": "grpo on the bundled arithmetic prompts"}.get(
        objective, f"{objective} on the bundled preference demo")
    default = {"sft": "demo", "grpo": "grpo-demo"}.get(objective, "dpo-demo")
    shown = recipe if recipe and ("/" in recipe or recipe.endswith((".yaml", ".yml"))) else \
        f"recipes/{recipe or default}.yaml"
    return f"{data} (see {shown})"


def reports_here() -> bool:
    """One process speaks for the run: not the ranks `loraq train --nproc` started, and only rank 0 under torchrun."""
    from loraq.training.launch import LAUNCHED_ENV

    return os.environ.get(LAUNCHED_ENV) != "1" and os.environ.get("RANK", "0") == "0"


def print_report(summary: dict, run_dir) -> None:
    s = summary
    lines = [f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_seconds']:.0f} s "
             f"({s['tokens_per_second']:.0f} tokens/s, peak memory {s['peak_memory_bytes'] / 2**30:.2f} GB)",
             f"train loss {s['train_loss']:.4f}"
             + (f", eval loss {s['eval_loss']:.4f}" if s.get("eval_loss") is not None
                and s.get("objective") != "grpo" else "")]
    if s.get("final_preference_accuracy") is not None:
        base = s.get("base_preference_accuracy")
        lines.append(f"preference accuracy (validation pairs): base {base:.1%} -> tuned "
                     f"{s['final_preference_accuracy']:.1%}; reward accuracy {s['eval_reward_accuracy']:.1%}, "
                     f"margin {s['eval_reward_margin']:.3f}")
    if s.get("final_accuracy") is not None:
        base = s.get("base_accuracy")
        lines.append(f"exact match: base {base:.1%} -> tuned {s['final_accuracy']:.1%}" if base is not None
                     else f"exact match: tuned {s['final_accuracy']:.1%}")
    if s.get("final_success") is not None:
        base = s.get("base_success")
        lines.append(f"held-out success (greedy, {s['eval_prompts']} prompts): "
                     + (f"base {base:.1%} -> " if base is not None else "") + f"tuned {s['final_success']:.1%}; "
                     + "reward " + (f"{s['base_reward']:.3f} -> " if s.get("base_reward") is not None else "")
                     + f"{s['final_reward']:.3f}")
    sample = s.get("sample") or s.get("grpo_sample")
    if sample:
        prompt = sample["prompt"]
        if isinstance(prompt, list):
            prompt = prompt[-1]["content"]
        lines += ["example:", f"  prompt:    {_one_line(prompt)}"]
        if "reference" in sample:
            lines.append(f"  reference: {_one_line(sample['reference'])}")
        if sample.get("base") is not None:
            lines.append(f"  before:    {_one_line(sample['base'])}")
        lines.append(f"  after:     {_one_line(sample['tuned'])}")
    lines += [f"files in {run_dir}/: adapter_config.json, adapter_model.safetensors, training_base.json, "
              "metrics.jsonl, summary.json, loss.png" + (", reward.png" if s.get("objective") == "grpo" else "")
              if s["method"] != "full"
              else f"files in {run_dir}/: model.safetensors, config.json, metrics.jsonl, summary.json, loss.png",
              f"next: loraq generate --adapter {run_dir} --prompt \"...\"   |   "
              f"loraq serve --adapter tuned={run_dir}   |   "
              f"loraq merge --adapter {run_dir} --out merged/   |   loraq export --adapter {run_dir} --out model.gguf"
              if s["method"] != "full"
              else f"next: loraq generate --model {run_dir} --prompt \"...\"   |   "
                   f"loraq export --model {run_dir} --out model.gguf"]
    print("\n".join(lines), flush=True)


def _one_line(text, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = ["add_arguments", "run"]
