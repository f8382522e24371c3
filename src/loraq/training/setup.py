"""Everything a run needs before its first step, as small typed objects.

    folder  = claim_run_folder(cfg, runtime)          the run folder, checked and held
    data    = build_data(cfg, tokenizer)              before the model: a bad file fails in seconds
    trained = load_trained_model(cfg, source, ...)    the model (4-bit for qlora), adapters, loss module
    optim   = make_optimization(cfg, model, batches)  AdamW, schedule, loss scaler, step count

:func:`setup_run` puts them together into a :class:`Run` (and resumes from
the newest checkpoint, or writes run.json); the loop (:mod:`loraq.training.loop`)
and the finish (:mod:`loraq.training.finish`) read it.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraq.config import TrainConfig
from loraq.data.batches import BatchIterator
from loraq.data.dataset import DataBundle, DataStats
from loraq.devices import dtype_name
from loraq.distributed.runtime import Runtime
from loraq.errors import ConfigError
from loraq.lora.config import LoraConfig
from loraq.lora.record import TrainingBase
from loraq.models.source import ModelSource
from loraq.training import checkpoint as ckpt
from loraq.training.evaluate import ExactMatch, exact_match_during_training
from loraq.training.metrics import MetricsWriter
from loraq.training.objective import CausalLMLoss
from loraq.training.rundir import (
    RunLock,
    check_something_to_resume,
    check_writable,
    clear_run_dir,
    lock_run_dir,
    prepare_run_dir,
    resolve_run_dir,
    write_run_file,
)
from loraq.training.schedule import make_scheduler, warmup_steps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Say = Callable[[str], None]


@dataclass
class RunFolder:
    """The run folder: ``mode`` "new", "overwrite" or "resume"; ``locks``: rank 0's hold on it; ``auto_resume``:
    a resume may start from step 0 when no checkpoint is complete (``--auto-resume``)."""

    path: Path
    mode: str
    locks: list[RunLock] = field(default_factory=list)
    auto_resume: bool = False

    def release(self) -> None:
        for lock in self.locks:  # (a process that dies releases them too)
            lock.close()


@dataclass
class TrainedModel:
    """The model as it trains: ``loss_module`` wraps it (and DDP/FSDP wraps that under several ranks)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    compute_dtype: torch.dtype
    lora_config: LoraConfig | None  # None for --method full
    training_base: TrainingBase | None
    loss_module: nn.Module
    trainable: int
    total: int


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    total_steps: int


@dataclass
class Counters:
    """What a checkpoint carries besides weights and optimizer (``state.json``'s "counters")."""

    tokens: int = 0
    skipped_steps: int = 0
    base_accuracy: float | None = None
    base_predictions: list[str] | None = None
    base_reward: float | None = None  # GRPO: the held-out prompts' greedy reward before training

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "skipped_steps": self.skipped_steps, "base_accuracy": self.base_accuracy,
                "base_predictions": self.base_predictions, "base_reward": self.base_reward}

    def update(self, saved: dict[str, Any]) -> None:
        for key in ("tokens", "skipped_steps", "base_accuracy", "base_predictions", "base_reward"):
            if key in saved:
                setattr(self, key, saved[key])


@dataclass
class Run:
    """A run between its setup and its finish; every field is set by :func:`setup_run`."""

    cfg: TrainConfig
    runtime: Runtime
    say: Say
    folder: RunFolder
    t_start: float
    data: DataBundle
    trained: TrainedModel
    batches: BatchIterator
    optim: Optimization
    counters: Counters
    metrics: MetricsWriter
    objective: Any = None  # training.objectives: SFT, or DPO / ORPO with the reference cache
    start_step: int = 0
    last_checkpoint: str | None = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def references(self) -> list:
        return self.data.references if self.cfg.eval_samples else []


def setup_run(cfg: TrainConfig, runtime: Runtime, say: Say) -> Run:
    """The folder, the data, the model with its adapters, the optimizer; resumed or started (see the module
    docstring)."""
    from loraq.models.load import check_loadable, load_tokenizer
    from loraq.models.source import resolve_source

    folder = claim_run_folder(cfg, runtime)
    # the one-time model fetch is not part of the run's time; rank 0 fetches, then the others find it cached
    runtime.on_main(lambda: resolve_source(cfg.model, allow_pickle=cfg.allow_pickle) and None)
    source = resolve_source(cfg.model, allow_pickle=cfg.allow_pickle)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    # every check before the first word is printed (a mistake is one line), the data before the model
    check_loadable(source, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    rewards = _load_rewards(cfg)  # GRPO: a bad --reward fails before the model loads
    data = _build_data(cfg, load_tokenizer(source, trust_remote_code=cfg.trust_remote_code))
    counters = Counters()
    trained = load_trained_model(cfg, source, runtime, say, data, counters, measure_base=folder.mode != "resume")
    batches = data.train_batches(cfg.batch_size * runtime.world_size, cfg.seed, runtime.rank, runtime.world_size)
    optim = make_optimization(cfg, trained, batches, runtime.device)
    objective = _make_objective(cfg, trained, data, folder, optim.total_steps, runtime.device, say, rewards)
    if cfg.objective == "grpo" and data.val and folder.mode != "resume":
        _record_base_success(counters, say, objective, data)
    if folder.mode == "new":  # the folder is made now: from here on it is this process's
        runtime.on_main(lambda: folder.locks.append(lock_run_dir(folder.path)))
    start_step, last_checkpoint = 0, None
    if folder.mode == "resume":
        start_step, last_checkpoint = resume(folder, trained, optim, batches, counters, runtime, say)
        objective.step = start_step  # (GRPO's sampling seeds follow the step)
        if last_checkpoint is not None:
            objective.read_state(ckpt.checkpoint_root(folder.path) / last_checkpoint)
    elif cfg.auto_resume:
        say(f"loraq: --auto-resume: nothing to resume in {folder.path} yet; starting a new run")
    metrics = open_run_files(cfg, folder, runtime, trained, start_step)
    if runtime.is_main:
        with ckpt.writing(folder.path, "the reference log-probabilities"):
            objective.save_reference(folder.path)
    return Run(cfg=cfg, runtime=runtime, say=say, folder=folder, t_start=t_start, data=data, trained=trained,
               batches=batches, optim=optim, counters=counters, metrics=metrics, objective=objective,
               start_step=start_step, last_checkpoint=last_checkpoint)


def _build_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> DataBundle:
    if cfg.objective == "grpo":
        from loraq.data.prompt_data import build_prompt_data

        return build_prompt_data(cfg, tokenizer)
    if cfg.objective != "sft":
        from loraq.data.preference import build_preference_data

        return build_preference_data(cfg, tokenizer)
    from loraq.data.dataset import build_data

    return build_data(cfg, tokenizer)


def _load_rewards(cfg: TrainConfig) -> list | None:
    if cfg.objective != "grpo":
        return None
    from loraq.training.rewards import load_rewards

    return load_rewards(cfg.reward)


def _make_objective(cfg: TrainConfig, trained: TrainedModel, data: DataBundle, folder: RunFolder, total_steps: int,
                    device: torch.device, say: Say, rewards: list | None = None):
    from loraq.training.objectives import make_objective

    return make_objective(cfg, trained.loss_module, trained.model, data, folder.path, total_steps, device, say,
                          resume=folder.mode == "resume", tokenizer=trained.tokenizer, rewards=rewards)


def claim_run_folder(cfg: TrainConfig, runtime: Runtime) -> RunFolder:
    """Rank 0 decides the folder (a default name holds the time) and checks it; every rank gets its answer or error."""
    from loraq.distributed.runtime import check_run_settings

    locks: list[RunLock] = []

    def claim() -> tuple[str, str]:
        run_dir = resolve_run_dir(cfg)
        mode = prepare_run_dir(run_dir, cfg)
        check_run_settings(cfg, runtime.world_size, run_dir, mode)
        check_writable(run_dir)
        if mode != "new":  # an existing run is held from now on: a second loraq on it fails before loading anything
            locks.append(lock_run_dir(run_dir))
        if mode == "resume":
            check_something_to_resume(run_dir, cfg)
        return str(run_dir), mode

    path, mode = runtime.on_main(claim)
    return RunFolder(Path(path), mode, locks, cfg.auto_resume)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_trained_model(cfg: TrainConfig, source: ModelSource, runtime: Runtime, say: Say, data: DataBundle,
                       counters: Counters, measure_base: bool) -> TrainedModel:
    """The base (4-bit for qlora), its accuracy before training, the adapters (or every weight), the loss module."""
    from loraq.lora.model import count_parameters

    fsdp = cfg.fsdp and runtime.distributed
    model, tokenizer, compute_dtype, quantized, fast_paths = _load_base(cfg, source, runtime.device, fsdp)
    lora_config = record = None
    if cfg.method != "full":
        lora_config, record = _adapter_plan(cfg, source, model, compute_dtype)
    _announce(cfg, source, runtime, say, compute_dtype, quantized, data.stats)
    say(f"loraq: {fast_paths}")
    refs = data.references if cfg.eval_samples else []
    if refs and measure_base and not fsdp and not cfg.init_adapter:  # under FSDP: once the model is sharded, below
        _record_base_accuracy(counters, say, model, tokenizer, data)
    _attach_adapters(cfg, model, lora_config, compute_dtype, getattr(data, "calibration", None))
    if refs and measure_base and cfg.init_adapter:  # the model this run starts from: base + the adapter it continues
        _record_base_accuracy(counters, say, model, tokenizer, data, start="the starting adapter's")
    trainable, total = count_parameters(model)
    say(f"loraq: trainable params: {trainable:,} ({100 * trainable / max(total, 1):.2f}%) of {total:,}")
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    full = cfg.method == "full"
    loss_class = CausalLMLoss if cfg.objective == "sft" else _sequence_logps_class(cfg.objective)
    loss_module: nn.Module = loss_class(model, compute_dtype if full and compute_dtype != torch.float32 else None)
    if runtime.distributed:
        from loraq.distributed.wrap import wrap_for_distributed

        loss_module = wrap_for_distributed(loss_module, cfg, runtime)
        runtime.seed_rank_streams(cfg.seed)
    if refs and measure_base and fsdp:
        # the model as initialised: the base itself for default/gaussian init (B = 0) and PiSSA (W_res + BA = W)
        _record_base_accuracy(counters, say, model, tokenizer, data, loss_module)
    return TrainedModel(model, tokenizer, source, compute_dtype, lora_config, record, loss_module, trainable, total)


def _sequence_logps_class(objective: str) -> type[nn.Module]:
    from loraq.training.logps import SequenceLogps, TokenLogps

    return TokenLogps if objective == "grpo" else SequenceLogps


def _load_base(cfg: TrainConfig, source: ModelSource, device: torch.device,
               fsdp: bool) -> tuple[nn.Module, PreTrainedTokenizerBase, torch.dtype, int, str]:
    """(model, tokenizer, compute dtype, 4-bit layers, the fast-paths line). FSDP loads on the CPU and moves
    each layer to the device as it shards it; full fine-tuning keeps fp32 master weights (bf16/fp16 through
    autocast); LoftQ and the calibrated init quantize the full-precision weights themselves, so both load
    unquantized."""
    from loraq.devices import resolve_dtype
    from loraq.kernels import apply_fast_paths
    from loraq.lora.model import QUANTIZING_INITS
    from loraq.models.load import load_model

    quantizes_itself = cfg.init in QUANTIZING_INITS
    loaded = load_model(source, method="lora" if quantizes_itself else cfg.method,
                        dtype="fp32" if cfg.method == "full" or quantizes_itself else cfg.dtype, quant=cfg.quant,
                        double_quant=cfg.double_quant, blocksize=cfg.blocksize, allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code, device=torch.device("cpu") if fsdp else device)
    fast_paths = apply_fast_paths(loaded.model, device).line()
    quantized = len(loaded.quantized_modules)
    return loaded.model, loaded.tokenizer, resolve_dtype(cfg.dtype, device), quantized, fast_paths


def _adapter_plan(cfg: TrainConfig, source: ModelSource, model: nn.Module,
                  compute_dtype: torch.dtype) -> tuple[LoraConfig, TrainingBase]:
    """The adapter's config (targets checked now: a mistake fails before the base evaluation) and its record."""
    from loraq.lora.targeting import find_targets, resolve_modules_to_save

    lora_config = LoraConfig.from_train_config(cfg)
    if cfg.init_adapter:
        from loraq.training.init_adapter import init_adapter_config

        lora_config = init_adapter_config(cfg)
    lora_config = lora_config.replace(base_model_name_or_path=adapter_base_name(source))
    find_targets(model, lora_config)
    resolve_modules_to_save(model, lora_config.modules_to_save)
    return lora_config, training_base_record(cfg, source, model, compute_dtype)


def _attach_adapters(cfg: TrainConfig, model: nn.Module, lora_config: LoraConfig | None,
                     compute_dtype: torch.dtype, calibration: list[list[int]] | None) -> None:
    """LoRA on the targets (LoftQ and the calibrated init quantize them as they go), or every weight trainable
    for --method full."""
    if lora_config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    from loraq.lora.model import QUANTIZING_INITS, cast_frozen, inject_lora

    if cfg.init_adapter:
        from loraq.training.init_adapter import load_init_adapter

        load_init_adapter(model, cfg)
        return
    quant = None
    if cfg.init in QUANTIZING_INITS:
        quant = {"quant_type": cfg.quant, "double_quant": cfg.double_quant, "blocksize": cfg.blocksize,
                 "compute_dtype": compute_dtype}
    inject_lora(model, lora_config, quant=quant, calibration=calibration)
    if cfg.init in QUANTIZING_INITS:
        cast_frozen(model, compute_dtype)


def _announce(cfg: TrainConfig, source: ModelSource, runtime: Runtime, say: Say, compute_dtype: torch.dtype,
              quantized: int, stats: DataStats) -> None:
    base_desc = dtype_name(compute_dtype)
    from loraq.lora.model import QUANTIZING_INITS

    fmt = f"{cfg.quant}{'+DQ' if cfg.double_quant else ''}"
    if cfg.method == "qlora" and cfg.init in QUANTIZING_INITS:  # loaded unquantized; the init quantizes as it fits
        base_desc += f", the adapted layers in {fmt} by the {cfg.init} init"
    elif cfg.method == "qlora":
        base_desc += f", {quantized} layers in {fmt}"
    say(f"loraq: {cfg.method} on {source.name} ({base_desc})")
    if runtime.distributed:
        say(f"loraq: {runtime.world_size} processes ({'FSDP2' if cfg.fsdp else 'DDP'}, {_backend()}); global batch "
            f"{cfg.batch_size * cfg.grad_accum * runtime.world_size} = batch-size {cfg.batch_size} x grad-accum "
            f"{cfg.grad_accum} x {runtime.world_size}")
    st = stats.train
    if stats.format == "prompts":
        say(f"loraq: data {stats.path} (prompts): {st.examples} prompts x {cfg.num_generations} completions, up to "
            f"{cfg.max_completion_length} tokens each"
            + (f"; {stats.val.examples} held-out prompts" if stats.val else ""))
        return
    if stats.format == "preference":
        say(f"loraq: data {stats.path} (preference): {st.examples} pairs, {st.trained_tokens} scored answer tokens"
            + (f", {st.truncated} with an answer cut" if st.truncated else "")
            + (f"; validation {stats.val.examples} pairs" if stats.val else ""))
        return
    say(f"loraq: data {stats.path} ({stats.format}): {st.examples} examples, {st.rows} rows, "
        f"{st.trained_tokens} trained tokens"
        + (f", {st.truncated} truncated" if st.truncated else "")
        + (f", {st.dropped} dropped (no trained token left)" if st.dropped else "")
        + f"; padding {100 * st.padding_fraction:.0f}% unpacked, {100 * st.padding_fraction_packed:.0f}% packed"
        + (f"; validation {stats.val.examples} examples" if stats.val else ""))


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else "single process"


def describe_references(data) -> str:
    """``64 held-out examples``, or ``64 training examples (...)`` when there is no validation data."""
    if getattr(data, "references_held_out", True):
        return f"{len(data.references)} held-out examples"
    return (f"{len(data.references)} training examples (no validation data: pass --val-fraction or --val-data "
            "to score held-out ones)")


def _record_base_accuracy(counters: Counters, say: Say, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                          data: DataBundle, loss_module: nn.Module | None = None, start: str = "base model") -> None:
    """Exact match of the model the run starts from (``start`` names it: the base, or the adapter continued)."""
    say(f"loraq: {start} exact match on {describe_references(data)} ...")
    base: ExactMatch = exact_match_during_training(model, tokenizer, data.references, data.max_answer_tokens,
                                                   loss_module)
    say(f"loraq: {start.removesuffix(' model')} accuracy {base.accuracy:.1%}")
    counters.base_accuracy, counters.base_predictions = base.accuracy, base.predictions[:3]


def _record_base_success(counters: Counters, say: Say, objective, data) -> None:
    """GRPO: the model as it starts, greedy on the held-out prompts (success, reward and a sample kept)."""
    say(f"loraq: base model on {len(data.val)} held-out prompts (greedy) ...")
    base = objective.evaluate_prompts(list(data.val))
    say(f"loraq: base success {base.metrics['success']:.1%}, reward {base.metrics['reward']:.3f}")
    counters.base_accuracy, counters.base_predictions = base.metrics["success"], [base.sample]
    counters.base_reward = base.metrics["reward"]


def make_optimization(cfg: TrainConfig, trained: TrainedModel, batches: BatchIterator,
                      device: torch.device) -> Optimization:
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * batches.batches_per_epoch
                                                                           / cfg.grad_accum))
    optimizer = make_optimizer(trained.model, cfg)
    scheduler = make_scheduler(optimizer, total_steps, warmup_steps(cfg.warmup, total_steps), cfg.schedule)
    scaler = (torch.amp.GradScaler(device.type) if trained.compute_dtype == torch.float16 and device.type == "cuda"
              else None)
    return Optimization(optimizer, scheduler, scaler, total_steps)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only, in the groups of :mod:`loraq.training.param_groups`
    (LoRA+'s rate for B, ``--embedding-lr``; no weight decay on biases, norms and magnitudes)."""
    from loraq.training.param_groups import param_groups

    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.loraplus_lr_ratio, cfg.embedding_lr)
    # the fused/foreach kernels change the summation order; keep the plain loop on CPU for bitwise resume
    foreach = False if next(model.parameters()).device.type == "cpu" else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=foreach)


def resume(folder: RunFolder, trained: TrainedModel, optim: Optimization, batches: BatchIterator,
           counters: Counters, runtime: Runtime, say: Say) -> tuple[int, str | None]:
    """Model, optimizer, schedule, data position, counters and RNG streams from the newest complete checkpoint;
    returns (the step to continue after, the checkpoint's name)."""
    loaded = ckpt.resume_latest(folder.path, model=trained.model, optimizer=optim.optimizer,
                                scheduler=optim.scheduler, data=batches, warn=lambda m: say(f"loraq: warning: {m}"))
    if runtime.is_main:
        ckpt.remove_stale_temporaries(folder.path)
    if loaded is None:
        if not folder.auto_resume:
            raise ConfigError(f"--resume: {folder.path} holds no complete checkpoint; drop --resume and pass "
                              "--overwrite to start it again (--auto-resume: resume when there is one, start "
                              "otherwise)")
        say(f"loraq: --auto-resume: no complete checkpoint in {folder.path}; starting from step 0")
        return 0, None
    runtime.restore_rng_state(loaded.path)
    counters.update(loaded.state.get("counters", {}))
    if optim.scaler is not None and loaded.state.get("scaler"):
        optim.scaler.load_state_dict(loaded.state["scaler"])
    say(f"loraq: resumed from {loaded.path.name} (step {loaded.step} of {optim.total_steps})")
    return loaded.step, loaded.path.name


def open_run_files(cfg: TrainConfig, folder: RunFolder, runtime: Runtime, trained: TrainedModel,
                   start_step: int) -> MetricsWriter:
    """run.json (a new run) and metrics.jsonl (cut back to the resumed step); an overwritten run is cleared first."""
    with ckpt.writing(folder.path, "run.json and metrics.jsonl"):  # a full disk at the start: one line too
        if runtime.is_main and folder.mode == "overwrite":
            clear_run_dir(folder.path)  # only now that the model and data loaded: a mistake costs the old run nothing
        if runtime.is_main and folder.mode != "resume":
            write_run_file(folder.path, cfg, {"model": trained.source.name, "model_path": str(trained.source.path),
                                              "method": cfg.method, "dtype": dtype_name(trained.compute_dtype),
                                              "world_size": runtime.world_size})
        return MetricsWriter(folder.path / "metrics.jsonl", enabled=runtime.is_main,
                             truncate_after_step=start_step if folder.mode == "resume" else None)


def training_base_record(cfg: TrainConfig, source: ModelSource, model: nn.Module,
                         compute_dtype: torch.dtype) -> TrainingBase:
    """What the adapter is trained against (:mod:`loraq.lora.record`): method, 4-bit settings, init, base identity."""
    from loraq.lora.adapted import source_fingerprint
    from loraq.lora.record import CORRECTING_INITS, FUNCTION_CHANGING_INITS, BaseModelId, QuantSettings

    quant = None
    if cfg.method == "qlora":
        state = next((m.quant_state for m in model.modules() if hasattr(m, "quant_state")), None)
        quant = (QuantSettings(state.quant_type, state.double_quant, state.blocksize) if state is not None
                 else QuantSettings(cfg.quant, cfg.double_quant, cfg.blocksize))  # LoftQ quantizes later
    return TrainingBase(method=cfg.method, compute_dtype=dtype_name(compute_dtype), quant=quant, init=cfg.init,
                        base_model=BaseModelId(adapter_base_name(source), source.kind, source_fingerprint(source)),
                        loftq_iters=cfg.loftq_iters if cfg.init == "loftq" else None,
                        initial_factors_appended=cfg.init in FUNCTION_CHANGING_INITS,
                        base_correction=cfg.init in CORRECTING_INITS)


def adapter_base_name(source: ModelSource) -> str:
    """What adapter_config.json records as the base: the hub id, or the local folder/file the user gave."""
    import os

    from loraq.models.default import DEFAULT_HUB_ID

    if source.kind == "default":
        return DEFAULT_HUB_ID
    if source.kind == "hub":
        return source.name
    return str(Path(source.origin).resolve()) if source.origin and os.path.exists(source.origin) else str(source.path)
