"""Before a run loads anything: ``--batch-size auto`` resolved, and a run that cannot fit stopped.

:func:`preflight` plans the run (:func:`loraq.planning.plan.make_plan`) and

* replaces ``batch_size: auto`` with the largest batch the plan fits into the
  memory available here with :data:`~loraq.planning.fit.AUTO_MARGIN` kept
  (resuming, the batch the run was started with), and says so;
* stops with one :class:`MemoryPlanError` line -- the predicted need, what is
  available, and the flags that would fit -- when the plan exceeds the
  available memory, unless ``--force``.

It runs once, in the process the user started: ``loraq train --nproc N``
resolves the batch before it launches the ranks (they get a number), and
under a torchrun started by hand ``auto`` is refused (each rank would measure
a different free memory, and the ranks must agree on the batch).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraq.config import AUTO
from loraq.errors import ConfigError, LoraqError
from loraq.planning.fit import AUTO_MARGIN
from loraq.planning.plan import MemoryPlan, make_plan, replan

GB = 1e9


class MemoryPlanError(LoraqError):
    """The memory plan of a run exceeds the memory available here."""


def preflight(cfg: Any, say: Callable[[str], None]) -> Any:
    """``cfg`` with a concrete batch size, after checking that the run fits (see the module docstring)."""
    auto = cfg.batch_size == AUTO
    if auto and "LOCAL_RANK" in os.environ:
        raise ConfigError("--batch-size auto is resolved before the ranks start: use `loraq train --nproc N`, "
                          "or give --batch-size a number under torchrun")
    resumed = _resumed_batch_size(cfg) if auto else None
    plan = _plan(cfg, resumed, say)
    if plan is None:
        return cfg
    if auto:
        cfg = dataclasses.replace(cfg, batch_size=plan.batch_size, explicit=set(cfg.explicit) | {"batch_size"})
        say(_auto_line(plan, resumed))
    if plan.fits is False and not cfg.force:
        raise MemoryPlanError(refusal(plan, cfg))
    if plan.fits is False:
        say(f"loraq: warning: --force: the plan needs {plan.need_bytes / GB:.1f} GB and "
            f"{plan.available_bytes / GB:.1f} GB is available here")
    return cfg


def _plan(cfg: Any, resumed: int | None, say: Callable[[str], None]) -> MemoryPlan | None:
    """The plan, cheaply when it can be: rows of --seq-len first (the worst case, no data read); the data is
    read only when that does not fit or the batch is to be chosen. None (and a warning) when planning itself
    failed on something other than a user mistake: the run is not held back by the planner."""
    try:
        if cfg.batch_size != AUTO:
            worst = make_plan(cfg, read_data=False)
            if worst.fits is not False:
                return worst
        return make_plan(cfg, batch_size=resumed)
    except LoraqError:
        raise
    except Exception as exc:  # noqa: BLE001 - a planner bug must not cost the user the run
        if os.environ.get("LORAQ_PLAN_STRICT"):  # the test suite: a planner bug fails the test that meets it
            raise
        if cfg.batch_size == AUTO:
            raise ConfigError(f"--batch-size auto: the memory plan failed ({type(exc).__name__}: {exc}); "
                              "give --batch-size a number") from None
        say(f"loraq: warning: no memory plan for this run ({type(exc).__name__}: {exc}); starting without it")
        return None


def _auto_line(plan: MemoryPlan, resumed: int | None) -> str:
    if resumed is not None:
        return f"loraq: --batch-size auto: {resumed}, as the run being resumed was started with"
    if plan.max_batch_size is None and plan.available_bytes is not None:
        return "loraq: --batch-size auto: 1 (not even one row fits the plan with its margin)"
    if plan.available_bytes is None:
        return "loraq: --batch-size auto: 1 (the memory available on this device is unknown)"
    return (f"loraq: --batch-size auto: {plan.batch_size} (predicted peak {plan.peak_bytes / GB:.2f} GB; "
            f"{plan.available_bytes / GB:.1f} GB available, a {round(100 * AUTO_MARGIN)}% margin kept)")


def _resumed_batch_size(cfg: Any) -> int | None:
    if not cfg.resume or not cfg.output_dir:
        return None
    try:
        saved = json.loads((Path(cfg.output_dir) / "run.json").read_text())["config"]["batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return saved if isinstance(saved, int) else None


def refusal(plan: MemoryPlan, cfg: Any) -> str:
    """The one line that stops a run: need, available, and what would fit."""
    need = f"{plan.need_bytes / GB:.1f} GB" + (f" ({plan.processes} processes)" if plan.processes > 1 else "")
    fixes = fitting_changes(plan, cfg)
    what = (f"{', or '.join(fixes)} would fit" if fixes
            else "nothing smaller fits: use a smaller --model or a machine with more memory")
    return (f"the memory plan of this run needs {need} at its peak ({plan.estimate.phase}) and "
            f"{plan.available_bytes / GB:.1f} GB is available here; {what} "
            f"(`loraq plan` shows the breakdown; --force starts anyway)")


def fitting_changes(plan: MemoryPlan, cfg: Any, limit: int = 3) -> list[str]:
    """Flags that bring the plan within the available memory, mildest first."""
    budget = plan.available_bytes
    if budget is None:
        return []

    def fits(**changes: Any) -> bool:
        return replan(plan, cfg, **changes).need_bytes <= budget

    found = []
    if plan.max_batch_size is not None and plan.max_batch_size < plan.batch_size:
        found.append(f"--batch-size {plan.max_batch_size}")
    if not cfg.grad_checkpointing and fits(grad_checkpointing=True):
        found.append("--grad-checkpointing")
    if cfg.method != "qlora" and fits(method="qlora"):
        found.append("--method qlora")
    if plan.max_seq_len is not None and plan.max_seq_len < plan.rows.longest:
        found.append(f"--seq-len {plan.max_seq_len}")
    if not found and not cfg.grad_checkpointing and fits(grad_checkpointing=True, batch_size=1):
        found.append("--grad-checkpointing --batch-size 1")
    return found[:limit]
