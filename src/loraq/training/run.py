"""A training run from its config: setup -> steps -> finish (``loraq train`` and :func:`loraq.train` run this)."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from loraq.config import TrainConfig
from loraq.errors import ConfigError
from loraq.training.finish import finish_run
from loraq.training.hooks import Callback
from loraq.training.loop import train_steps
from loraq.training.result import RunResult
from loraq.training.setup import setup_run
from loraq.training.trackers import close_trackers, make_trackers, require_packages


def run_training(cfg: TrainConfig, out: Callable[[str], None] | None = None,
                 callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train as ``cfg`` says; ``out`` receives the progress lines (default: stderr, rank 0 only)."""
    from loraq.distributed.runtime import init_runtime

    cfg.validate()
    require_packages(cfg.report_to)  # every rank: the same one line, before any process waits for another
    if not isinstance(cfg.batch_size, int):  # "auto" is the memory plan's to resolve, above this layer
        raise ConfigError("--batch-size auto is resolved by loraq.train / `loraq train`; give run_training a number")
    runtime = init_runtime()
    say = out or (lambda s: print(s, file=sys.stderr, flush=True))
    say_main = say if runtime.is_main else (lambda s: None)
    trackers = make_trackers(cfg.report_to, say) if runtime.is_main else []  # only rank 0 reports
    ended_well = False
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = setup_run(cfg, runtime, say_main)
        loop = train_steps(run, [*callbacks, *trackers])
        result = finish_run(run, loop, [*callbacks, *trackers])
        ended_well = True
        return result
    finally:
        close_trackers(trackers)
        runtime.shutdown(wait=ended_well)
