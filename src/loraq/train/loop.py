"""The training run, readable top to bottom as a loop.

    load model (4-bit for qlora) -> data -> base accuracy -> add LoRA -> optimizer
    -> [resume] -> for each step: grad_accum micro-batches, backward, clip, step
    -> eval / checkpoint / log -> final eval -> adapter, metrics, summary, loss.png

The loss of a step is the token-level mean over the whole global batch (all
micro-batches of all ranks): each micro-batch's summed loss is divided by the
global number of trained tokens, so N ranks, or one rank accumulating N
micro-batches, produce the same gradient.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from loraq import faults
from loraq.config import TrainConfig
from loraq.devices import dtype_name
from loraq.errors import LoraqError
from loraq.train import checkpoint as ckpt
from loraq.train.loss import fused_linear_cross_entropy, release_buffers, shift_targets
from loraq.train.metrics import MetricsWriter, Throughput, current_rss_bytes, peak_memory_bytes
from loraq.train.progress import Progress
from loraq.train.report import plot_loss, write_summary
from loraq.train.rundir import (check_writable, clear_run_dir, lock_run_dir, prepare_run_dir, resolve_run_dir,
                                write_run_file)
from loraq.train.schedule import make_scheduler, warmup_steps


class TrainingDiverged(LoraqError):
    """A NaN/inf loss or gradient under ``--nonfinite stop``."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir


# ---------------------------------------------------------------------------
# the model's loss


class CausalLMLoss(nn.Module):
    """``forward(input_ids, labels, position_ids, attention_mask, normalizer) -> loss``.

    For models whose logits are just ``lm_head(hidden)`` the head and the
    cross-entropy are fused (:mod:`loraq.train.loss`); any other model goes
    through its own forward and the plain formula. Wrapping the loss in a
    module lets DDP see one forward per micro-batch.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        config = getattr(model, "config", None)
        plain_head = (isinstance(head, nn.Linear) and type(head) is nn.Linear and backbone is not None
                      and not getattr(config, "final_logit_softcapping", None)
                      and not getattr(config, "logit_scale", None) and not getattr(config, "logits_scaling", None))
        self._fused = plain_head
        self._backbone = backbone
        self._head = head

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def forward(self, input_ids, labels, position_ids, attention_mask=None, normalizer: float | None = None):
        targets = shift_targets(labels)
        with self._autocast():
            if self._fused:
                hidden = self._backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
                head = self._head
                weight = head.weight if self.autocast_dtype is None else head.weight.to(self.autocast_dtype)
                bias = head.bias
                if bias is not None and self.autocast_dtype is not None:
                    bias = bias.to(self.autocast_dtype)
                return fused_linear_cross_entropy(hidden.to(weight.dtype), weight, targets, normalizer, bias=bias)
            logits = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                use_cache=False).logits
        return reference_loss_from_logits(logits, targets, normalizer)


def reference_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    import torch.nn.functional as F

    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    n = normalizer if normalizer is not None else max(int((targets != -100).sum()), 1)
    return loss / n


def batch_loss(loss_module: nn.Module, batch, normalizer: float | None) -> torch.Tensor:
    return loss_module(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask, normalizer)


# ---------------------------------------------------------------------------
# setup helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def total_steps_for(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    # the fused/foreach kernels change the summation order; keep the plain loop on CPU for bitwise resume
    if next(model.parameters()).device.type == "cpu":
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, **kwargs)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------
# the run


def run_training(cfg: TrainConfig, out: Callable[[str], None] | None = None) -> RunResult:
    """Train as ``cfg`` says; see the module docstring."""
    from loraq.distributed.runtime import init_runtime

    cfg.validate()
    runtime = init_runtime()
    say = out or (lambda s: print(s, file=sys.stderr, flush=True))
    say_main = (lambda s: say(s)) if runtime.is_main else (lambda s: None)
    try:
        return _run(cfg, runtime, say_main)
    finally:
        runtime.shutdown()


@dataclass
class _Run:
    """What a run holds between its setup, its steps and its finish (see :func:`_run`)."""
    cfg: TrainConfig
    runtime: Any
    say: Callable[[str], None]
    run_dir: Path
    mode: str  # "new", "overwrite" or "resume"
    run_lock: list
    source: Any
    t_start: float
    data: Any
    model: nn.Module
    tokenizer: Any
    compute_dtype: torch.dtype
    lora_config: Any
    training_base: Any  # lora.record.TrainingBase, written beside the adapter (None for --method full)
    loss_module: nn.Module
    refs: list
    trainable: int
    total: int
    batches: Any = None
    total_steps: int = 0
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    start_step: int = 0
    counters: dict = None
    last_ckpt_name: str | None = None
    metrics: Any = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device


@dataclass
class _LoopResult:
    train_seconds: float
    setup_seconds: float
    tokens_per_second: float
    last_loss: float
    last_eval: Any
    training_memory: list


def _run(cfg: TrainConfig, runtime, say: Callable[[str], None]) -> RunResult:
    """setup (folder, data, model, adapters, optimizer, resume) -> the steps -> final evaluation and files."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = _setup(cfg, runtime, say)
    loop = _train_steps(run)
    return _finish(run, loop)


def _claim_run_dir(cfg: TrainConfig, runtime, run_lock: list) -> tuple[Path, str]:
    """Rank 0 decides the folder (a default name holds the time) and checks it; every rank gets its answer or error."""
    from loraq.distributed.runtime import check_run_settings

    def claim():
        run_dir = resolve_run_dir(cfg)
        mode = prepare_run_dir(run_dir, cfg)
        check_run_settings(cfg, runtime.world_size, run_dir, mode)
        check_writable(run_dir)
        if mode != "new":  # an existing run is held from now on: a second loraq on it fails before loading anything
            run_lock.append(lock_run_dir(run_dir))
        return str(run_dir), mode

    run_dir_str, mode = runtime.on_main(claim)
    return Path(run_dir_str), mode


def _setup(cfg: TrainConfig, runtime, say: Callable[[str], None]) -> _Run:
    from loraq.data.dataset import build_data
    from loraq.devices import resolve_dtype
    from loraq.lora.model import count_parameters
    from loraq.models.load import check_loadable, load_model, load_tokenizer
    from loraq.models.source import resolve_source

    run_lock: list = []  # rank 0's hold on the run folder (rundir.lock_run_dir)
    run_dir, mode = _claim_run_dir(cfg, runtime, run_lock)
    # the one-time model fetch is not part of the run's time; rank 0 fetches, then the others find it cached
    runtime.on_main(lambda: resolve_source(cfg.model, allow_pickle=cfg.allow_pickle) and None)
    source = resolve_source(cfg.model, allow_pickle=cfg.allow_pickle)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    # every check before the first word is printed (a mistake is one line), the data before the model
    # (a malformed file is reported in seconds, not after minutes of loading weights)
    check_loadable(source, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    data = build_data(cfg, load_tokenizer(source, trust_remote_code=cfg.trust_remote_code))

    device = runtime.device
    full = cfg.method == "full"
    # FSDP loads on the CPU and moves each layer to the device as it shards it: no device holds the whole model
    fsdp = cfg.fsdp and runtime.distributed
    loftq = cfg.init == "loftq"
    # full fine-tuning keeps fp32 master weights (bf16/fp16 via autocast); LoftQ quantizes the full-precision
    # weights itself, so both load unquantized
    load_dtype = "fp32" if full or loftq else cfg.dtype
    loaded = load_model(source, method="lora" if loftq else cfg.method, dtype=load_dtype, quant=cfg.quant, double_quant=cfg.double_quant,
                        blocksize=cfg.blocksize, allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code, device=torch.device("cpu") if fsdp else device)
    model, tokenizer = loaded.model, loaded.tokenizer
    use_fast_kernels(model)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    autocast_dtype = compute_dtype if full and compute_dtype != torch.float32 else None
    base_desc = dtype_name(compute_dtype)
    if cfg.method == "qlora":
        base_desc += f", {len(loaded.quantized_modules)} layers in {cfg.quant}{'+DQ' if cfg.double_quant else ''}"
    lora_config = training_base = None
    if not full:
        from loraq.lora.config import LoraConfig
        from loraq.lora.targeting import find_targets, resolve_modules_to_save

        lora_config = LoraConfig.from_train_config(cfg).replace(base_model_name_or_path=adapter_base_name(source))
        training_base = training_base_record(cfg, source, model, compute_dtype)
        find_targets(model, lora_config)  # --target-modules that match no layer: an error now, not after the base eval
        resolve_modules_to_save(model, lora_config.modules_to_save)
    say(f"loraq: {cfg.method} on {source.name} ({base_desc})")
    if runtime.distributed:
        say(f"loraq: {runtime.world_size} processes ({'FSDP2' if fsdp else 'DDP'}, {dist_backend()}); global batch "
            f"{cfg.batch_size * cfg.grad_accum * runtime.world_size} = batch-size {cfg.batch_size} x grad-accum "
            f"{cfg.grad_accum} x {runtime.world_size}")
    _say_data(say, data.stats)

    # accuracy of the model we start from (before any adapter), on held-out references
    refs = data.references if cfg.eval_samples else []
    base_em = None
    if refs and mode != "resume" and not fsdp:  # under FSDP: once the model is sharded, below
        base_em = _base_accuracy(say, model, tokenizer, data, refs)

    # adapters (or everything, for full fine-tuning)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from loraq.lora.model import cast_frozen, inject_lora

        quant = None
        if loftq:
            quant = {"quant_type": cfg.quant, "double_quant": cfg.double_quant, "blocksize": cfg.blocksize,
                     "compute_dtype": compute_dtype}
        inject_lora(model, lora_config, quant=quant)
        if loftq:
            cast_frozen(model, compute_dtype)
    trainable, total = count_parameters(model)
    say(f"loraq: trainable params: {trainable:,} ({100 * trainable / max(total, 1):.2f}%) of {total:,}")
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    loss_module: nn.Module = CausalLMLoss(model, autocast_dtype)
    if runtime.distributed:
        from loraq.distributed.wrap import wrap_for_distributed

        loss_module = wrap_for_distributed(loss_module, cfg, runtime)
        runtime.seed_rank_streams(cfg.seed)
    if refs and mode != "resume" and fsdp:
        # the model as initialised: the base itself for default/gaussian init (B = 0) and PiSSA (W_res + BA = W)
        base_em = _base_accuracy(say, model, tokenizer, data, refs, loss_module)

    run = _Run(cfg=cfg, runtime=runtime, say=say, run_dir=run_dir, mode=mode, run_lock=run_lock, source=source,
               t_start=t_start, data=data, model=model, tokenizer=tokenizer, compute_dtype=compute_dtype,
               lora_config=lora_config, training_base=training_base, loss_module=loss_module, refs=refs, trainable=trainable, total=total)
    run.batches = data.train_batches(cfg.batch_size * runtime.world_size, cfg.seed, runtime.rank, runtime.world_size)
    run.total_steps = total_steps_for(cfg, run.batches.batches_per_epoch)
    run.optimizer = make_optimizer(model, cfg)
    run.scheduler = make_scheduler(run.optimizer, run.total_steps, warmup_steps(cfg.warmup, run.total_steps), cfg.schedule)
    run.scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 and device.type == "cuda" else None
    run.counters = {"tokens": 0, "skipped_steps": 0, "base_accuracy": None, "base_predictions": None}
    if base_em is not None:
        run.counters["base_accuracy"] = base_em.accuracy
        run.counters["base_predictions"] = base_em.predictions[:3]
    if mode == "new":  # the folder is made now: from here on it is this process's
        runtime.on_main(lambda: run_lock.append(lock_run_dir(run_dir)))
    if mode == "resume":
        _resume(run)
    elif cfg.resume:
        say(f"loraq: --resume: nothing to resume in {run_dir} yet; starting a new run")
    with ckpt.writing(run_dir, "run.json and metrics.jsonl"):  # a full disk at the start: one line too
        if runtime.is_main and mode == "overwrite":
            clear_run_dir(run_dir)  # only now that the model and data loaded: a mistake in them costs the old run nothing
        if runtime.is_main and mode != "resume":
            write_run_file(run_dir, cfg, {"model": source.name, "model_path": str(source.path), "method": cfg.method,
                                          "dtype": dtype_name(compute_dtype), "world_size": runtime.world_size})
        run.metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=runtime.is_main,
                                    truncate_after_step=run.start_step if mode == "resume" else None)
    return run


def _say_data(say: Callable[[str], None], st) -> None:
    say(f"loraq: data {st.path} ({st.format}): {st.train.examples} examples, {st.train.rows} rows, "
        f"{st.train.trained_tokens} trained tokens"
        + (f", {st.train.truncated} truncated" if st.train.truncated else "")
        + (f", {st.train.dropped} dropped (no trained token left)" if st.train.dropped else "")
        + f"; padding {100 * st.train.padding_fraction:.0f}% unpacked, {100 * st.train.padding_fraction_packed:.0f}% packed"
        + (f"; validation {st.val.examples} examples" if st.val else ""))


def _base_accuracy(say, model, tokenizer, data, refs, loss_module=None):
    say(f"loraq: base model exact match on {len(refs)} examples ...")
    base_em = exact_match_eval(model, tokenizer, data, refs, loss_module)
    say(f"loraq: base accuracy {base_em.accuracy:.1%}")
    return base_em


def _resume(run: _Run) -> None:
    """Model, optimizer, schedule, data position, counters and RNG streams from the newest complete checkpoint."""
    say = run.say
    loaded = ckpt.resume_latest(run.run_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                data=run.batches, warn=lambda m: say(f"loraq: warning: {m}"))
    if run.runtime.is_main:
        ckpt.remove_stale_temporaries(run.run_dir)
    if loaded is None:
        say(f"loraq: --resume: no complete checkpoint in {run.run_dir}; starting from step 0")
        return
    run.start_step = loaded.step
    run.last_ckpt_name = loaded.path.name
    run.runtime.restore_rng_state(loaded.path)
    run.counters.update(loaded.state.get("counters", {}))
    if run.scaler is not None and loaded.state.get("scaler"):
        run.scaler.load_state_dict(loaded.state["scaler"])
    say(f"loraq: resumed from {loaded.path.name} (step {run.start_step} of {run.total_steps})")


def _save_checkpoint(run: _Run, step: int) -> None:
    from safetensors.torch import save_file

    from loraq.distributed.runtime import RANK_RNG_FILE

    rank_rng = run.runtime.gather_rng_states()  # every rank's dropout stream, for an exact resume
    if not run.runtime.is_main:
        return
    state = {"data": run.batches.state_dict(), "counters": run.counters,
             "scaler": run.scaler.state_dict() if run.scaler is not None else None}
    extra = None if rank_rng is None else (lambda tmp: save_file(rank_rng, str(tmp / RANK_RNG_FILE)))
    path = ckpt.save_checkpoint(run.run_dir, step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                state=state, write_extra=extra, keep=run.cfg.keep_checkpoints)
    run.last_ckpt_name = path.name


def _optimizer_step(run: _Run, step: int, params: list) -> tuple[float, float, bool, int]:
    """One optimizer step over grad_accum micro-batches: (loss, grad norm, finite, tokens)."""
    cfg, runtime, scaler, optimizer = run.cfg, run.runtime, run.scaler, run.optimizer
    micro = [next(run.batches) for _ in range(cfg.grad_accum)]
    normalizer = max(1, sum(b.global_trained_tokens for b in micro))
    step_loss = 0.0
    for i, batch in enumerate(micro):
        batch = batch.to(run.device)
        sync = (i == len(micro) - 1) or not runtime.distributed
        with (contextlib.nullcontext() if sync else run.loss_module.no_sync()):
            loss = faults.loss(step, batch_loss(run.loss_module, batch, normalizer))
            # DDP averages gradients over ranks; the loss is already a global mean, so undo that
            scaled = loss * runtime.world_size
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += float(loss.detach())
    step_loss = runtime.sum(step_loss)
    faults.grads(step, params)
    faults.point("after-backward")
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
    finite = math.isfinite(step_loss) and (math.isfinite(grad_norm) or scaler is not None)
    if not finite:
        if cfg.nonfinite == "stop":
            where = (f"last good checkpoint: {run.run_dir / 'checkpoints' / run.last_ckpt_name}" if run.last_ckpt_name
                     else "no checkpoint was written yet")
            raise TrainingDiverged(f"step {step}: the {'loss' if not math.isfinite(step_loss) else 'gradient'} "
                                   f"is {step_loss if not math.isfinite(step_loss) else grad_norm} ({where}); "
                                   "lower --lr, use --dtype fp32, or pass --nonfinite skip")
        run.counters["skipped_steps"] += 1
        optimizer.zero_grad(set_to_none=True)
    elif scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    faults.point("after-optimizer-step")
    step_tokens = int(runtime.sum(sum(b.num_tokens for b in micro)))
    return step_loss, grad_norm, finite, step_tokens


def _evaluate(run: _Run, step: int):
    """Validation loss over the held-out rows, written to metrics.jsonl as of ``step`` (None with no rows)."""
    result = _eval_loss(run.loss_module, lambda: run.data.val_batches(run.cfg.batch_size), run.device, run.runtime)
    if result is not None:
        run.metrics.write({"kind": "eval", "step": step, "eval_loss": result.loss, "perplexity": result.perplexity})
    return result


def _train_steps(run: _Run) -> _LoopResult:
    """The steps from the start (or resumed) step to the last, with logging, evaluation and checkpoints."""
    cfg, runtime, metrics, device = run.cfg, run.runtime, run.metrics, run.device
    progress = Progress(run.total_steps, run.start_step, enabled=runtime.is_main, log_every=cfg.log_every)
    params = trainable_parameters(run.model)
    throughput = Throughput()
    last_loss, last_eval = float("nan"), None
    t_loop = time.perf_counter()  # loading, data and the base evaluation are behind us
    try:
        for step in range(run.start_step + 1, run.total_steps + 1):
            faults.point("step-start")
            step_loss, grad_norm, finite, step_tokens = _optimizer_step(run, step, params)
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            run.counters["tokens"] += step_tokens
            throughput.add(step_tokens)
            if finite:  # a skipped step's NaN is not the run's loss
                last_loss = step_loss
            mem = peak_memory_bytes(device)
            if step % cfg.log_every == 0 or step == run.total_steps:
                metrics.write({"kind": "train", "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens": run.counters["tokens"], "tokens_per_second": throughput.tokens_per_second(),
                               "memory_bytes": mem, "elapsed": time.perf_counter() - run.t_start,
                               **({"skipped": True} if not finite else {})})
            progress.update(step, step_loss, lr, throughput.tokens_per_second(), current_rss_bytes())

            if run.data.val and cfg.eval_every and step % cfg.eval_every == 0 and step != run.total_steps:
                last_eval = _evaluate(run, step)
                if last_eval is not None:
                    progress.message(f"loraq: step {step}: eval loss {last_eval.loss:.4f} (ppl {last_eval.perplexity:.2f})")
            if cfg.save_every and step % cfg.save_every == 0 and step != run.total_steps:
                _save_checkpoint(run, step)
    except OSError as exc:  # metrics.jsonl (a checkpoint's own failure is already an OutputError)
        error = ckpt.output_error(exc, run.run_dir, "metrics.jsonl")
        if error is None:
            raise
        raise error from None
    finally:
        progress.close()
    train_seconds = time.perf_counter() - t_loop
    release_buffers()  # the loss's scratch and head copy: evaluation and generation do without them
    # what each rank holds while training (weights, their shards under FSDP, optimizer state, caches)
    training_memory = runtime.gather(torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes())
    return _LoopResult(train_seconds=train_seconds, setup_seconds=t_loop - run.t_start,
                       tokens_per_second=throughput.tokens_per_second(),  # the training rate, before the final eval
                       last_loss=last_loss, last_eval=last_eval, training_memory=training_memory)


def _finish(run: _Run, loop: _LoopResult) -> RunResult:
    """Final evaluation, the adapter (or model), summary.json and loss.png; then the run folder is released."""
    cfg, runtime, say, data, source = run.cfg, run.runtime, run.say, run.data, run.source
    last_eval = loop.last_eval
    if data.val:
        last_eval = _evaluate(run, run.total_steps)
        if last_eval is not None:
            say(f"loraq: eval loss {last_eval.loss:.4f} (perplexity {last_eval.perplexity:.2f})")
    final_em = None
    if run.refs:
        say(f"loraq: tuned model exact match on {len(run.refs)} examples ...")
        final_em = exact_match_eval(run.model, run.tokenizer, data, run.refs, run.loss_module)
        say(f"loraq: tuned accuracy {final_em.accuracy:.1%}")
    run.metrics.close()

    if runtime.is_main:
        with ckpt.writing(run.run_dir, "the final adapter" if run.lora_config is not None else "the final model"):
            save_final(run.run_dir, run.model, run.tokenizer, cfg, run.lora_config, run.training_base, run.compute_dtype)
    wall = time.perf_counter() - run.t_start
    counters = run.counters
    summary = {
        "method": cfg.method,
        "model": source.name,
        "data": data.stats.path,
        "format": data.stats.format,
        "dtype": dtype_name(run.compute_dtype),
        "steps": run.total_steps,
        "tokens": counters["tokens"],
        "train_loss": loop.last_loss,
        "eval_loss": None if last_eval is None else last_eval.loss,
        "eval_perplexity": None if last_eval is None else last_eval.perplexity,
        "tokens_per_second": loop.tokens_per_second,
        "peak_memory_bytes": int(runtime.max(peak_memory_bytes(run.device))),  # the largest rank's
        "peak_memory_bytes_per_rank": runtime.gather(peak_memory_bytes(run.device)),
        "training_memory_bytes_per_rank": loop.training_memory,
        "wall_seconds": wall,
        "train_seconds": loop.train_seconds,  # the training loop alone
        "setup_seconds": loop.setup_seconds,  # loading, data, base evaluation
        "trainable_parameters": run.trainable,
        "total_parameters": run.total,
        "world_size": runtime.world_size,
        "skipped_steps": counters["skipped_steps"],
        "base_accuracy": counters.get("base_accuracy"),
        "final_accuracy": None if final_em is None else final_em.accuracy,
        "eval_examples": len(run.refs),
    }
    if run.refs and final_em is not None:
        r0 = run.refs[0]
        summary["sample"] = {"prompt": r0.messages or r0.prompt, "reference": r0.answer,
                             "base": (counters.get("base_predictions") or [None])[0],
                             "tuned": final_em.predictions[0]}
    if runtime.is_main:
        with ckpt.writing(run.run_dir, "summary.json and loss.png"):
            write_summary(run.run_dir, summary)
            plot_loss(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png",
                      title=f"{cfg.method} · {source.name} · {Path(data.stats.path).name}")
    runtime.barrier()  # every rank returns once rank 0's files are there
    for lock in run.run_lock:  # (a process that dies releases it too)
        lock.close()
    return RunResult(run_dir=run.run_dir, summary=summary)


def use_fast_kernels(model: nn.Module) -> None:
    """loraq's matmul attention for short CPU sequences (it hands everything else to SDPA), and the lean
    RMSNorm / SiLU-gate autograd on known architectures (``loraq.kernels``)."""
    from loraq.kernels.fused import apply_fused_modules

    apply_fused_modules(model)
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return
    from loraq.kernels.attention import register

    model.set_attn_implementation(register())


def training_base_record(cfg: TrainConfig, source, model: nn.Module, compute_dtype: torch.dtype):
    """What the adapter is trained against (:mod:`loraq.lora.record`): method, 4-bit settings, init, base identity."""
    from loraq.adapted import source_fingerprint
    from loraq.lora.record import BASE_CHANGING_INITS, BaseModelId, QuantSettings, TrainingBase

    quant = None
    if cfg.method == "qlora":
        state = next((m.quant_state for m in model.modules() if hasattr(m, "quant_state")), None)
        quant = (QuantSettings(state.quant_type, state.double_quant, state.blocksize) if state is not None
                 else QuantSettings(cfg.quant, cfg.double_quant, cfg.blocksize))  # LoftQ quantizes later
    return TrainingBase(method=cfg.method, compute_dtype=dtype_name(compute_dtype), quant=quant, init=cfg.init,
                        base_model=BaseModelId(adapter_base_name(source), source.kind, source_fingerprint(source)),
                        loftq_iters=cfg.loftq_iters if cfg.init == "loftq" else None,
                        initial_factors_appended=cfg.init in BASE_CHANGING_INITS)


def adapter_base_name(source) -> str:
    """What adapter_config.json records as the base: the hub id, or the local folder/file the user gave."""
    from loraq.models.default import DEFAULT_HUB_ID

    if source.kind == "default":
        return DEFAULT_HUB_ID
    if source.kind == "hub":
        return source.name
    return str(Path(source.origin).resolve()) if source.origin and os.path.exists(source.origin) else str(source.path)


def _eval_loss(loss_module, val_batches, device, runtime):
    from loraq.train.evaluate import EvalLoss

    was = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    rng = torch.get_rng_state()  # evaluation must not shift the training run's random stream
    batches = list(val_batches())
    rounds = math.ceil(len(batches) / runtime.world_size)
    try:
        with torch.no_grad():
            # rank r takes batches r, r + N, ...; every rank runs the same number of forwards (FSDP gathers
            # weights in each), the ones past the end repeating the last batch and counting nothing
            for k in range(rounds):
                index = k * runtime.world_size + runtime.rank
                batch = batches[min(index, len(batches) - 1)].to(device)
                loss = float(batch_loss(loss_module, batch, 1.0))
                if index < len(batches):
                    total += loss
                    count += batch.num_trained_tokens
    finally:
        torch.set_rng_state(rng)
        loss_module.train(was)
    total, count = runtime.sum(total), runtime.sum(count)
    return EvalLoss(loss=total / count, tokens=int(count)) if count else None


def exact_match_eval(model, tokenizer, data, refs, loss_module=None):
    from loraq.distributed.wrap import gathered_for_inference
    from loraq.train.evaluate import exact_match

    rng = torch.get_rng_state()
    try:
        with gathered_for_inference(loss_module):  # FSDP: every rank generates the same, in step
            return exact_match(model, tokenizer, refs, max_new_tokens=data.max_answer_tokens,
                               stop_token_ids=data.stop_token_ids)
    finally:
        torch.set_rng_state(rng)


def dist_backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else "single process"


def save_final(run_dir: Path, model, tokenizer, cfg: TrainConfig, lora_config, training_base, compute_dtype) -> None:
    """The adapter (PEFT format) at the top of the run folder; for full fine-tuning, the whole model."""
    import shutil
    import tempfile

    from loraq.paths import fsync_dir

    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    try:
        if lora_config is None:
            from loraq.models.hf_folder import write_model_folder

            write_model_folder(model, tokenizer, tmp, compute_dtype)
        else:
            from loraq.lora.files import save_adapter

            from loraq.lora.record import write_training_base

            save_adapter(model, tmp / "adapter", base_model_name_or_path=lora_config.base_model_name_or_path)
            write_training_base(tmp / "adapter", training_base)
            for f in (tmp / "adapter").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "adapter").rmdir()
        faults.point("final-save", tmp)
        for f in tmp.iterdir():
            os.replace(f, run_dir / f.name)
        fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
