"""A run's memory plan: the model's shape, the data's rows, the estimate, and what fits here.

    plan = make_plan(cfg)                 # cfg: a validated TrainConfig (batch_size may be "auto")
    plan.peak_bytes, plan.estimate.terms  # the predicted peak and its terms
    plan.max_batch_size, plan.max_seq_len # the largest that fit the memory available (AUTO_MARGIN kept)

Nothing here loads a weight: config.json, the safetensors headers, the
tokenizer and the data (tokenized as training will) are all it reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loraq.config import AUTO
from loraq.planning.estimate import Estimate, estimate
from loraq.planning.fit import AUTO_MARGIN, available_bytes, largest_fitting, with_margin
from loraq.planning.rows import RowShape, rows_at_seq_len, rows_from_data
from loraq.planning.settings import RunSettings
from loraq.planning.shapes import ModelShape, model_shape

MAX_BATCH = 1 << 16  # TrainConfig's bound on --batch-size


@dataclass
class MemoryPlan:
    """See the module docstring; ``processes``: ranks sharing this host's memory (``--nproc`` on a CPU)."""

    model: str
    method: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    rows: RowShape
    shape: ModelShape
    estimate: Estimate
    processes: int
    available_bytes: int | None
    max_batch_size: int | None
    max_seq_len: int | None
    group: int = 1  # rows per batch entry: GRPO's completions per prompt

    @property
    def peak_bytes(self) -> int:
        """The predicted peak of one process (comparable to summary.json's ``peak_memory_bytes``)."""
        return self.estimate.peak_bytes

    @property
    def need_bytes(self) -> int:
        """What the machine must hold: every process on this host."""
        return self.peak_bytes * self.processes

    @property
    def fits(self) -> bool | None:
        return None if self.available_bytes is None else self.need_bytes <= self.available_bytes

    def to_dict(self) -> dict[str, Any]:
        est = self.estimate
        return {"peak_bytes": self.peak_bytes, "phase": est.phase, "model": self.model, "method": self.method,
                "device": self.device, "dtype": self.dtype, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "rows_per_batch_entry": self.group,
                "longest_row": self.rows.longest, "rows_from_data": self.rows.from_data,
                "breakdown": {name: size for name, size in est.terms},
                "training_step_bytes": est.step_bytes, "loading_bytes": est.loading_bytes,
                "generation_bytes": est.generation_bytes, "processes": self.processes,
                "need_bytes": self.need_bytes, "available_bytes": self.available_bytes, "fits": self.fits,
                "max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len, "margin": AUTO_MARGIN,
                "parameters": self.shape.total_params, "adapter_parameters": self.shape.adapter_params}


def make_plan(cfg: Any, *, device: str | None = None, memory: int | None = None, read_data: bool = True,
              batch_size: int | None = None) -> MemoryPlan:
    """The plan of ``cfg`` on ``device`` (default: where training would run) against ``memory`` bytes (default:
    what is available here); ``batch_size`` overrides cfg's (an "auto" cfg gets the largest that fits)."""
    from loraq.models.load import check_loadable, load_tokenizer
    from loraq.models.source import resolve_source

    source = resolve_source(cfg.model, allow_pickle=cfg.allow_pickle)
    check_loadable(source, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    shape = model_shape(source, cfg)
    rows = (rows_from_data(cfg, load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)) if read_data
            else rows_at_seq_len(cfg))
    device = device or _default_device()
    e, dtype = _compute_bytes(cfg.dtype, device)
    processes = cfg.nproc if device == "cpu" else 1
    available = memory if memory is not None else available_bytes(device)

    def settings(batch: int) -> RunSettings:
        return run_settings(cfg, batch, e, device)

    budget = None if available is None else available // processes
    cap = max(1, min(MAX_BATCH, rows.rows // max(1, cfg.nproc)))
    max_batch = None if budget is None else largest_fitting(
        lambda b: with_margin(estimate(shape, rows, settings(b)).peak_bytes), budget, 1, cap)
    chosen = batch_size or (cfg.batch_size if cfg.batch_size != AUTO else (max_batch or 1))
    max_seq = None if budget is None else largest_fitting(
        lambda t: with_margin(estimate(shape, rows.at_length(t), settings(chosen)).peak_bytes), budget, 8,
        shape_max_positions(source))
    return MemoryPlan(model=source.name, method=cfg.method, device=device, dtype=dtype, batch_size=chosen,
                      seq_len=cfg.seq_len, rows=rows, shape=shape, estimate=estimate(shape, rows, settings(chosen)),
                      processes=processes, available_bytes=available, max_batch_size=max_batch, max_seq_len=max_seq,
                      group=cfg.num_generations if getattr(cfg, "objective", "sft") == "grpo" else 1)


def replan(plan: MemoryPlan, cfg: Any, **changes: Any) -> MemoryPlan:
    """The same model and data under changed settings (``batch_size=``, ``grad_checkpointing=``, ...), re-estimated
    without reading anything again; ``seq_len=`` takes rows of that length."""
    new_cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k != "batch_size"})
    rows = plan.rows.at_length(changes["seq_len"]) if "seq_len" in changes else plan.rows
    e, _ = _compute_bytes(new_cfg.dtype, plan.device)
    batch = changes.get("batch_size", plan.batch_size)
    run = run_settings(new_cfg, batch, e, plan.device)
    shape = plan.shape if new_cfg.method == cfg.method else _reshaped(plan.shape, new_cfg)
    return dataclasses.replace(plan, method=new_cfg.method, batch_size=batch, rows=rows, shape=shape,
                               estimate=estimate(shape, rows, run))


def run_settings(cfg: Any, batch: int, compute_bytes: int, device: str) -> RunSettings:
    """The run ``cfg`` describes at ``batch`` rows, computing in ``compute_bytes`` bytes a value on ``device``."""
    lora = None
    if cfg.method != "full":
        from loraq.lora.config import LoraConfig

        lora = LoraConfig.from_train_config(cfg)
    if getattr(cfg, "objective", "sft") == "grpo":  # each prompt is a group of completions
        batch *= cfg.num_generations
    return RunSettings(method=cfg.method, batch_size=batch, compute_bytes=compute_bytes, device=device,
                       grad_checkpointing=cfg.grad_checkpointing, double_quant=cfg.double_quant,
                       blocksize=cfg.blocksize, eval_every=cfg.eval_every, lora=lora, quant_type=cfg.quant)


def _reshaped(shape: ModelShape, cfg: Any) -> ModelShape:
    """The shape under another --method: LoRA ranks on the default targets (all linear layers) or none."""
    rank = 0 if cfg.method == "full" else cfg.rank
    linears = tuple(dataclasses.replace(lin, rank=rank) for lin in shape.linears)
    return dataclasses.replace(shape, linears=linears)


def shape_max_positions(source: Any) -> int:
    from loraq.models.source import read_config

    config = read_config(source.path, source.origin or source.name)
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 1 << 20)


def _default_device() -> str:
    from loraq.devices import default_device

    kind = default_device().type
    return kind if kind in ("cpu", "cuda") else "cpu"


def _compute_bytes(dtype: str, device: str) -> tuple[int, str]:
    """(bytes per element, name) of the compute dtype ``--dtype`` gives on ``device``."""
    import torch

    from loraq.devices import dtype_name, resolve_dtype

    if dtype == "auto" and device == "cuda" and not torch.cuda.is_available():
        return 2, "bf16"  # planning for a GPU from a machine without one: every recent GPU computes bf16
    resolved = resolve_dtype(dtype, torch.device(device))
    return resolved.itemsize, dtype_name(resolved)
