"""What every tracker shares: the names its scalars get, and failures kept to one warning.

A subclass implements ``start(settings)``, ``log(scalars, step)`` and
``finish(summary, step)``; :class:`Tracker` calls them from the callback
points and turns any exception into one warning, after which that tracker is
silent and the run goes on.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from loraq.training.hooks import Callback

# metrics.jsonl keys that are not scalars of the run
NOT_SCALARS = {"kind", "step", "skipped"}


def metric_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: ``<kind>/<key>``, an ``eval_`` prefix dropped (``eval/loss``)."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"{kind}/{key.removeprefix(kind + '_')}"] = float(value)
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's finite numbers as ``summary/<key>``."""
    return {f"summary/{key}": float(value) for key, value in summary.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))}


def flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as numbers, booleans or strings (lists and mappings as JSON, None as "")."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value, default=str, sort_keys=True)
    return out


class Tracker(Callback):
    """A Callback reporting to one tracker (see the module docstring)."""

    name = "tracker"

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.failed = False
        self.open = False
        self.last_step = 0

    # what a tracker implements
    def start(self, settings: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, Any] | None, step: int) -> None:
        raise NotImplementedError

    # the callback points
    def on_train_start(self, settings: dict) -> None:
        if self._guard("start", self.start, settings):
            self.open = True

    def on_metrics(self, record: dict) -> None:
        self.last_step = int(record.get("step", self.last_step))
        if self.open:
            self._guard("log", self.log, metric_scalars(record), self.last_step)

    def on_train_end(self, summary: dict) -> None:
        self.close(summary)

    def close(self, summary: dict | None = None) -> None:
        """Finish the tracker's run (``summary`` None: the run stopped before its end)."""
        if self.open:
            self.open = False
            self._guard("finish", self.finish, summary, self.last_step)

    def _guard(self, what: str, fn: Callable[..., None], *args: Any) -> bool:
        if self.failed:
            return False
        try:
            fn(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must never cost the run
            self.failed = True
            self.open = False
            self.say(f"loraq: warning: --report-to {self.name}: {what} failed ({type(exc).__name__}: "
                     f"{' '.join(str(exc).split())[:200]}); the run goes on without it")
            return False
