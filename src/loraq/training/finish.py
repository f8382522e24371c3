"""The end of a run: final evaluation, the adapter (or model), summary.json and loss.png; the folder released."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraq import faults
from loraq.devices import dtype_name
from loraq.training import checkpoint as ckpt
from loraq.training.evaluate import EvalLoss, ExactMatch, exact_match_during_training
from loraq.training.hooks import Callback
from loraq.training.loop import LoopResult, describe_eval, evaluate
from loraq.training.metrics import peak_memory_bytes
from loraq.training.report import plot_loss, plot_reward, write_summary
from loraq.training.result import RunResult
from loraq.training.setup import Run, TrainedModel, describe_references


def finish_run(run: Run, loop: LoopResult, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Final evaluation, files, summary; every rank returns once rank 0's files are there."""
    cfg, runtime, data, trained = run.cfg, run.runtime, run.data, run.trained
    last_eval = loop.last_eval
    if data.val:
        last_eval = evaluate(run, run.optim.total_steps, callbacks) or last_eval
        if last_eval is not None:
            run.say(f"loraq: {describe_eval(last_eval)}")
    final_em = None
    if run.references:
        run.say(f"loraq: tuned model exact match on {describe_references(data)} ...")
        final_em = exact_match_during_training(trained.model, trained.tokenizer, run.references,
                                               data.max_answer_tokens, trained.loss_module)
        run.say(f"loraq: tuned accuracy {final_em.accuracy:.1%}")
    run.metrics.close()
    if runtime.is_main:
        with ckpt.writing(run.folder.path,
                          "the final adapter" if trained.lora_config is not None else "the final model"):
            save_final(run.folder.path, trained)
    summary = build_summary(run, loop, last_eval, final_em)
    if runtime.is_main:
        with ckpt.writing(run.folder.path, "summary.json and loss.png"):
            write_summary(run.folder.path, summary)
            title = f"{cfg.method} · {trained.source.name} · {Path(data.stats.path).name}"
            plot_loss(run.folder.path / "metrics.jsonl", run.folder.path / "loss.png", title=title)
            if cfg.objective == "grpo":
                plot_reward(run.folder.path / "metrics.jsonl", run.folder.path / "reward.png", title=title,
                            base_success=run.counters.base_accuracy)
    for callback in callbacks:
        callback.on_train_end(summary)
    runtime.barrier()
    run.folder.release()
    return RunResult(run_dir=run.folder.path, summary=summary)


def build_summary(run: Run, loop: LoopResult, last_eval: EvalLoss | None,
                  final_em: ExactMatch | None) -> dict[str, Any]:
    cfg, runtime, data, trained, counters = run.cfg, run.runtime, run.data, run.trained, run.counters
    summary = {
        "method": cfg.method, "model": trained.source.name, "data": data.stats.path, "format": data.stats.format,
        "dtype": dtype_name(trained.compute_dtype), "steps": run.optim.total_steps, "tokens": counters.tokens,
        "train_loss": loop.last_loss,
        "eval_loss": None if last_eval is None else last_eval.loss,
        "eval_perplexity": None if last_eval is None else last_eval.perplexity,
        "tokens_per_second": loop.tokens_per_second,
        "peak_memory_bytes": int(runtime.max(peak_memory_bytes(run.device))),  # the largest rank's
        "peak_memory_bytes_per_rank": runtime.gather(peak_memory_bytes(run.device)),
        "training_memory_bytes_per_rank": loop.training_memory,
        "wall_seconds": time.perf_counter() - run.t_start,
        "train_seconds": loop.train_seconds,  # the training loop alone
        "setup_seconds": loop.setup_seconds,  # loading, data, base evaluation
        "trainable_parameters": trained.trainable, "total_parameters": trained.total,
        "world_size": runtime.world_size, "skipped_steps": counters.skipped_steps,
        "base_accuracy": counters.base_accuracy,
        "final_accuracy": None if final_em is None else final_em.accuracy,
        "eval_examples": len(run.references),
        "eval_examples_held_out": bool(getattr(data, "references_held_out", True)),
        "objective": cfg.objective,
    }
    if cfg.objective == "grpo":
        summary.update(grpo_summary(run, last_eval))
    elif cfg.objective != "sft":
        summary.update(preference_summary(run, last_eval))
    if run.references and final_em is not None:
        first = run.references[0]
        summary["sample"] = {"prompt": first.messages or first.prompt, "reference": first.answer,
                             "base": (counters.base_predictions or [None])[0], "tuned": final_em.predictions[0]}
    return summary


def preference_summary(run: Run, last_eval: EvalLoss | None) -> dict[str, Any]:
    """DPO / ORPO: the validation pairs' preference accuracy before and after, and the final evaluation's metrics."""
    metrics = getattr(last_eval, "metrics", None) or {}
    reference = run.objective.reference
    return {"eval_perplexity": None,
            "base_preference_accuracy": None if reference is None else reference.base_preference_accuracy(),
            "final_preference_accuracy": metrics.get("preference_accuracy"),
            "eval_pairs": len(run.data.val), **{f"eval_{k}": v for k, v in metrics.items()}}


def grpo_summary(run: Run, last_eval: EvalLoss | None) -> dict[str, Any]:
    """GRPO: held-out success and reward before and after (greedy), and the first held-out prompt's completions."""
    metrics = getattr(last_eval, "metrics", None) or {}
    counters, val = run.counters, run.data.val
    out = {"eval_perplexity": None, "eval_prompts": len(val), "base_success": counters.base_accuracy,
           "final_success": metrics.get("success"), "base_reward": counters.base_reward,
           "final_reward": metrics.get("reward"), **{f"eval_{k}": v for k, v in metrics.items()}}
    if val and last_eval is not None:
        out["grpo_sample"] = {"prompt": val[0].prompt, "base": (counters.base_predictions or [None])[0],
                              "tuned": getattr(last_eval, "sample", None)}
    return out


def save_final(run_dir: Path, trained: TrainedModel) -> None:
    """The adapter (PEFT format, with its training record) at the top of the run folder; for full fine-tuning,
    the whole model as a HF folder. Written in a temporary folder first, then moved file by file."""
    from loraq.paths import fsync_dir

    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    try:
        if trained.lora_config is None:
            from loraq.models.hf_folder import write_model_folder

            write_model_folder(trained.model, trained.tokenizer, tmp, trained.compute_dtype)
        else:
            from loraq.lora.files import save_adapter
            from loraq.lora.record import write_training_base

            save_adapter(trained.model, tmp / "adapter",
                         base_model_name_or_path=trained.lora_config.base_model_name_or_path)
            write_training_base(tmp / "adapter", trained.training_base)
            for f in (tmp / "adapter").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "adapter").rmdir()
        faults.point("final-save", tmp)
        for f in tmp.iterdir():
            os.replace(f, run_dir / f.name)
        fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
