"""``loraq.plan``: the Python twin of ``loraq plan``: a training run's predicted peak memory, before it runs.

    import loraq
    plan = loraq.plan(model="org/model", method="qlora", batch_size=4, seq_len=512)
    plan.peak_bytes, plan.estimate.terms, plan.max_batch_size, plan.to_dict()

Keyword arguments are ``loraq train``'s (a recipe as ``recipe=``), plus
``device`` ("cpu" or "cuda"; default: where training would run) and
``memory`` (bytes to plan against instead of what is available here).
Nothing is loaded but config.json, the weight files' headers, the tokenizer
and the data (see :mod:`loraq.planning`).
"""
from __future__ import annotations

from typing import Any

from loraq.config import TrainConfig
from loraq.errors import ConfigError
from loraq.planning.plan import MemoryPlan, make_plan

DEVICES = ("cpu", "cuda")


def plan(config: TrainConfig | None = None, *, recipe: str | None = None, device: str | None = None,
         memory: int | None = None, **flags: Any) -> MemoryPlan:
    """The :class:`~loraq.planning.plan.MemoryPlan` of the run these settings describe."""
    from loraq.api.train import build_config

    if device is not None and device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not one of: {', '.join(DEVICES)}")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
        raise ConfigError(f"--memory must be a positive size in GB, got {memory!r}")
    cfg = build_config(config, recipe, **flags)
    return make_plan(cfg, device=device, memory=None if memory is None else int(memory))
