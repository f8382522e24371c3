"""Learning-rate schedule: linear warmup, then cosine, linear or constant.

With ``w`` warmup steps and ``T`` total steps, the multiplier at step ``t`` is::

    t < w:        t / w
    cosine:       0.5 * (1 + cos(pi * (t - w) / (T - w)))
    linear:       (T - t) / (T - w)
    constant:     1

(the same curves as transformers' ``get_*_schedule_with_warmup``).
"""
from __future__ import annotations

import math

import torch


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``--warmup`` below 1 is a fraction of the run, otherwise a number of steps."""
    steps = math.ceil(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(steps, total_steps)


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, warmup, schedule))
