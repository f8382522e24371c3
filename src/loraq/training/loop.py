"""The steps of a run, from the first (or resumed) step to the last.

    for step in start+1 .. total:
        callbacks.on_step_start(step)
        grad_accum micro-batches: forward, backward    (the loss is a token mean over the whole global batch)
        clip, optimizer step (or skip a non-finite one), schedule
        metrics line, progress bar, callbacks.on_step_end(step, result)
        every --eval-every: validation loss, callbacks.on_eval(step, result)
        every --save-every: checkpoint

The loss of a step is the token-level mean over the whole global batch (all
micro-batches of all ranks): each micro-batch's summed loss is divided by the
global number of trained tokens, so N ranks, or one rank accumulating N
micro-batches, produce the same gradient.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loraq import faults
from loraq.errors import LoraqError
from loraq.training import checkpoint as ckpt
from loraq.training.evaluate import EvalLoss
from loraq.training.hooks import Callback, StepResult
from loraq.training.metrics import Throughput, current_rss_bytes, peak_memory_bytes
from loraq.training.objective import unwrapped
from loraq.training.progress import Progress
from loraq.training.rewards import RewardError
from loraq.training.setup import Run


class TrainingDiverged(LoraqError):
    """A NaN/inf loss or gradient under ``--nonfinite stop``."""


@dataclass
class LoopResult:
    train_seconds: float  # the loop alone
    setup_seconds: float  # loading, data, the base evaluation
    tokens_per_second: float  # the training rate, taken before the final evaluation
    last_loss: float
    last_eval: EvalLoss | None
    training_memory: list[int]  # per rank, while training


def train_steps(run: Run, callbacks: Sequence[Callback] = ()) -> LoopResult:
    """Every step of the run, with logging, evaluation and checkpoints (see the module docstring)."""
    cfg, runtime = run.cfg, run.runtime
    progress = Progress(run.optim.total_steps, run.start_step, enabled=runtime.is_main, log_every=cfg.log_every)
    params = [p for p in run.trained.model.parameters() if p.requires_grad]
    throughput = Throughput()
    last_loss, last_eval = float("nan"), None
    t_loop = time.perf_counter()
    settings = run_settings(run)
    for callback in callbacks:
        callback.on_train_start(settings)
    try:
        for step in range(run.start_step + 1, run.optim.total_steps + 1):
            faults.point("step-start")
            for callback in callbacks:
                callback.on_step_start(step)
            result = optimizer_step(run, step, params)
            throughput.add(result.tokens)
            if result.finite:  # a skipped step's NaN is not the run's loss
                last_loss = result.loss
            _log_step(run, step, result, throughput, progress, callbacks)
            for callback in callbacks:
                callback.on_step_end(step, result)
            if _due(cfg.eval_every, step, run) and run.data.val:
                last_eval = evaluate(run, step, callbacks) or last_eval
                if last_eval is not None:
                    progress.message(f"loraq: step {step}: {describe_eval(last_eval)}")
            if _due(cfg.save_every, step, run):
                save_checkpoint(run, step)
    except RewardError as exc:  # the user's reward function: keep the steps done, then say what failed
        raise RewardError(f"{exc}{_keep_progress(run, step - 1)}") from None
    except OSError as exc:  # metrics.jsonl (a checkpoint's own failure is already an OutputError)
        error = ckpt.output_error(exc, run.folder.path, "metrics.jsonl")
        if error is None:
            raise
        raise error from None
    finally:
        progress.close()
    train_seconds = time.perf_counter() - t_loop
    unwrapped(run.trained.loss_module).release_buffers()  # evaluation and generation do without them
    device = run.device
    memory = runtime.gather(torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes())
    return LoopResult(train_seconds=train_seconds, setup_seconds=t_loop - run.t_start,
                      tokens_per_second=throughput.tokens_per_second(), last_loss=last_loss, last_eval=last_eval,
                      training_memory=memory)


def _keep_progress(run: Run, done: int) -> str:
    """A checkpoint of the ``done`` steps before a failure the user can fix (none: nothing was trained yet, or
    that checkpoint exists); the words saying where the run can continue from."""
    if done <= run.start_step:
        return ""
    if run.last_checkpoint != ckpt.checkpoint_name(done):
        save_checkpoint(run, done)
    return (f" (steps 1-{done} are kept in {run.folder.path / 'checkpoints' / run.last_checkpoint}: pass --resume "
            "once it is fixed)")


def _due(every: int, step: int, run: Run) -> bool:
    """A periodic action at ``step`` (never at the last step: the finish does that one)."""
    return bool(every) and step % every == 0 and step != run.optim.total_steps


def _log_step(run: Run, step: int, result: StepResult, throughput: Throughput, progress: Progress,
              callbacks: Sequence[Callback] = ()) -> None:
    run.counters.tokens += result.tokens
    if step % run.cfg.log_every == 0 or step == run.optim.total_steps:
        write_metrics(run, {"kind": "train", "step": step, "loss": result.loss, "lr": result.lr,
                            "grad_norm": result.grad_norm, "tokens": run.counters.tokens,
                            "tokens_per_second": throughput.tokens_per_second(),
                            "memory_bytes": peak_memory_bytes(run.device),
                            "elapsed": time.perf_counter() - run.t_start, **result.metrics,
                            **({"skipped": True} if not result.finite else {})}, callbacks)
    extra, m = "", result.metrics
    if "reward_accuracy" in m:
        extra = f"  acc {m['reward_accuracy']:.2f}  margin {m['reward_margin']:.3f}"
    elif "reward" in m:  # GRPO: the loss is ~0 on-policy by construction; the reward says how it goes
        extra = f"  reward {m['reward']:.3f}  len {m['completions/mean_length']:.0f}"
    progress.update(step, result.loss, result.lr, throughput.tokens_per_second(), current_rss_bytes(), extra)


def write_metrics(run: Run, record: dict, callbacks: Sequence[Callback] = ()) -> None:
    """One metrics.jsonl line (rank 0 writes it), then the callbacks' ``on_metrics`` with the same object."""
    run.metrics.write(record)
    if run.runtime.is_main:
        for callback in callbacks:
            callback.on_metrics(record)


def run_settings(run: Run) -> dict:
    """What a run was started with (``on_train_start``): every TrainConfig key, as run.json records them, and
    what was resolved from them."""
    from loraq.devices import dtype_name

    trained = run.trained
    return {**run.cfg.to_dict(), "model_name": trained.source.name, "compute_dtype": dtype_name(trained.compute_dtype),
            "world_size": run.runtime.world_size, "run_dir": str(run.folder.path),
            "trainable_parameters": trained.trainable, "total_parameters": trained.total,
            "total_steps": run.optim.total_steps, "start_step": run.start_step}


def optimizer_step(run: Run, step: int, params: list[nn.Parameter]) -> StepResult:
    """One optimizer step over grad_accum micro-batches (the schedule advances too)."""
    cfg, runtime, optim = run.cfg, run.runtime, run.optim
    position = run.batches.state_dict()
    micro = [next(run.batches) for _ in range(cfg.grad_accum)]
    objective = run.objective
    try:
        normalizer = objective.counts(micro)  # GRPO samples and scores here, before any gradient
    except RewardError:
        run.batches.load_state_dict(position)  # the step did not happen: its prompts are still to come
        raise
    step_loss = 0.0
    for i, batch in enumerate(micro):
        batch = batch.to(run.device)
        sync = (i == len(micro) - 1) or not runtime.distributed
        with (contextlib.nullcontext() if sync else run.trained.loss_module.no_sync()):
            loss = faults.loss(step, objective.loss(run.trained.loss_module, batch, normalizer))
            # DDP averages gradients over ranks; the loss is already a global mean, so undo that
            scaled = loss * runtime.world_size
            (optim.scaler.scale(scaled) if optim.scaler is not None else scaled).backward()
        step_loss += float(loss.detach())
    step_loss = runtime.sum(step_loss)
    faults.grads(step, params)
    faults.point("after-backward")
    if optim.scaler is not None:
        optim.scaler.unscale_(optim.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf))
    finite = math.isfinite(step_loss) and (math.isfinite(grad_norm) or optim.scaler is not None)
    _apply_or_skip(run, step, finite, step_loss, grad_norm)
    faults.point("after-optimizer-step")
    lr = optim.scheduler.get_last_lr()[0]
    optim.scheduler.step()
    tokens = int(runtime.sum(sum(b.num_tokens for b in micro)))
    return StepResult(loss=step_loss, grad_norm=grad_norm, lr=lr, tokens=tokens, finite=finite,
                      metrics=objective.step_metrics())


def _apply_or_skip(run: Run, step: int, finite: bool, loss: float, grad_norm: float) -> None:
    """The optimizer step; a non-finite one stops the run (``--nonfinite stop``) or is skipped and counted."""
    optim = run.optim
    if not finite:
        if run.cfg.nonfinite == "stop":
            where = (f"last good checkpoint: {run.folder.path / 'checkpoints' / run.last_checkpoint}"
                     if run.last_checkpoint else "no checkpoint was written yet")
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient", grad_norm)
            raise TrainingDiverged(f"step {step}: the {what} is {value} ({where}); "
                                   "lower --lr, use --dtype fp32, or pass --nonfinite skip")
        run.counters.skipped_steps += 1
    elif optim.scaler is not None:
        optim.scaler.step(optim.optimizer)
        optim.scaler.update()
    else:
        optim.optimizer.step()
    optim.optimizer.zero_grad(set_to_none=True)


def evaluate(run: Run, step: int, callbacks: Sequence[Callback] = ()) -> EvalLoss | None:
    """Validation loss over the held-out rows, written to metrics.jsonl as of ``step`` (None with no rows)."""
    result = run.objective.validate(run.trained.loss_module, lambda: run.data.val_batches(run.cfg.batch_size),
                                    run.device, run.runtime)
    if result is not None:
        metrics = getattr(result, "metrics", None)
        details = {"perplexity": result.perplexity} if metrics is None else {f"eval_{k}": v for k, v in metrics.items()}
        write_metrics(run, {"kind": "eval", "step": step, "eval_loss": result.loss, **details}, callbacks)
        for callback in callbacks:
            callback.on_eval(step, result)
    return result


def describe_eval(result: EvalLoss) -> str:
    """``eval loss 1.2345 (ppl 3.44)``; for preference pairs the accuracies and the margin instead of perplexity."""
    metrics = getattr(result, "metrics", None)
    if metrics is None:
        return f"eval loss {result.loss:.4f} (ppl {result.perplexity:.2f})"
    if "success" in metrics:
        return (f"held-out reward {metrics['reward']:.3f}, success {metrics['success']:.1%} on {result.tokens} "
                "prompts (greedy)")
    return (f"eval loss {result.loss:.4f}, preference accuracy {metrics['preference_accuracy']:.1%}, "
            f"reward accuracy {metrics['reward_accuracy']:.1%}, margin {metrics['reward_margin']:.3f}")


def save_checkpoint(run: Run, step: int) -> None:
    """Everything an exact resume needs, written by rank 0 (every rank's dropout stream gathered first)."""
    from safetensors.torch import save_file

    from loraq.distributed.runtime import RANK_RNG_FILE

    rank_rng = run.runtime.gather_rng_states()
    if not run.runtime.is_main:
        return
    optim = run.optim
    state = {"data": run.batches.state_dict(), "counters": run.counters.to_dict(),
             "scaler": optim.scaler.state_dict() if optim.scaler is not None else None}

    def extra(tmp):
        if rank_rng is not None:
            save_file(rank_rng, str(tmp / RANK_RNG_FILE))
        run.objective.write_state(tmp)

    path = ckpt.save_checkpoint(run.folder.path, step, model=run.trained.model, optimizer=optim.optimizer,
                                scheduler=optim.scheduler, state=state, write_extra=extra,
                                keep=run.cfg.keep_checkpoints)
    run.last_checkpoint = path.name
