"""``loraq.train``: the Python twin of ``loraq train``.

    import loraq
    result = loraq.train(data="chat.jsonl", method="qlora", max_steps=100)
    result.summary["final_accuracy"], result.run_dir

Keyword arguments are the flag names with underscores; a recipe path may be
given as ``recipe=``. With no data, the bundled demo run is used (the same
settings as ``loraq train`` with no arguments).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from loraq.config import TrainConfig, load_recipe
from loraq.training.hooks import Callback
from loraq.training.result import RunResult


def demo_overrides() -> dict[str, Any]:
    """The bundled demo recipe: what `loraq train` with no data runs."""
    from pathlib import Path

    return load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml")


def build_config(config: TrainConfig | None = None, recipe: str | None = None, **overrides: Any) -> TrainConfig:
    cfg = config if config is not None else TrainConfig()
    if recipe:
        cfg.update(load_recipe(recipe), source=f"recipe {recipe}")
    cfg.update(overrides, source="train()")
    return apply_demo_defaults(cfg).validate()


def apply_demo_defaults(cfg: TrainConfig) -> TrainConfig:
    """With no --data, fill every setting the user did not give from the demo recipe (SFT runs only: a preference
    run without --data takes the bundled preference demo, and its recipe ``dpo-demo`` gives its settings)."""
    if cfg.data is not None or cfg.objective != "sft":
        return cfg
    explicit = set(cfg.explicit)
    for key, value in demo_overrides().items():
        if key.replace("-", "_") not in explicit:
            cfg.update({key: value}, source="demo recipe")
    cfg.explicit = explicit  # demo values are defaults, not the user's choices
    return cfg


def train(config: TrainConfig | None = None, *, recipe: str | None = None,
          callbacks: Sequence[Callback] = (), **overrides: Any) -> RunResult:
    """Run training; returns a :class:`~loraq.training.result.RunResult` (``run_dir``, ``summary``).

    ``callbacks``: :class:`~loraq.training.hooks.Callback` objects told of each step and evaluation (Python
    only; under ``nproc > 1`` the ranks run in other processes and no callback is called here).
    """
    cfg = build_config(config, recipe, **overrides)
    from loraq.training.trackers import require_packages

    require_packages(cfg.report_to)
    cfg = check_memory(cfg)
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from loraq.training.launch import launch_torchrun

        return launch_torchrun(cfg)
    from loraq.training.run import run_training

    return run_training(cfg, callbacks=callbacks)


def check_memory(cfg: TrainConfig) -> TrainConfig:
    """The memory plan before anything loads: ``--batch-size auto`` resolved, a run that cannot fit stopped
    (:mod:`loraq.planning.preflight`); the ranks a launcher started were planned by it."""
    from loraq.config import AUTO

    if "LOCAL_RANK" in os.environ and cfg.batch_size != AUTO:
        return cfg
    from loraq.planning.preflight import preflight

    return preflight(cfg, lambda line: print(line, file=sys.stderr, flush=True))
