"""Fault injection: a TEST HOOK for the reliability suite, inert unless an environment variable is set.

The training loop and the checkpoint writer pass named points; these
variables make a process fail there on purpose, so that a test can hit a
moment that timing alone would rarely hit (the middle of a checkpoint write):

``LORAQ_CRASH_AT="checkpoint-write:2"``
    the process SIGKILLs itself the 2nd time it reaches ``checkpoint-write``
    (count from 1; several entries separated by commas, the first to fire wins).

``LORAQ_FAULT="nan-loss:3"``  (also ``inf-loss:N``, ``nan-grad:N``, ``inf-grad:N``)
    the loss (or one gradient) of optimizer step N is made NaN/inf, as a
    numerical blow-up would make it.

``LORAQ_FAULT="enospc:checkpoint-write:2"``  (also ``erofs:POINT:N``, ``eacces:POINT:N``)
    the 2nd time ``POINT`` is reached it raises the OSError the operating
    system would raise when the disk is full (the folder read-only, ...).

Points: ``step-start`` (top of an optimizer step), ``after-backward`` (gradients
computed, weights not yet updated), ``after-optimizer-step`` (weights updated,
schedule and metrics not yet), ``checkpoint-write`` (inside the temporary
checkpoint folder, weights and optimizer written, RNG and ``state.json`` not),
``checkpoint-renamed`` (the new checkpoint in place, older ones not yet
pruned), ``checkpoint-saved`` (after pruning), ``final-save`` (the final
adapter written to its temporary folder, not yet moved into the run folder),
``data-store-write`` (a chunk of tokenized data appended to a token store
that is still in its temporary folder), ``gguf-tensor`` (a GGUF export about
to write one tensor's data into its temporary file).

The variables are read once, at import (``reset()`` re-reads them, for
in-process tests). With neither set, every hook is one global lookup and a
return. Never set them outside tests.
"""
from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterable

CRASH_ENV = "LORAQ_CRASH_AT"
FAULT_ENV = "LORAQ_FAULT"
POINTS = ("step-start", "after-backward", "after-optimizer-step", "checkpoint-write", "checkpoint-renamed",
          "checkpoint-saved", "final-save", "data-store-write", "gguf-tensor")
_OS_ERRORS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES}
_NUMERIC = {"nan-loss", "inf-loss", "nan-grad", "inf-grad"}

_plan: dict | None = None  # None: nothing planned (the fast path)
_hits: dict[str, int] = {}


def _parse() -> dict | None:
    crash, fault = os.environ.get(CRASH_ENV, "").strip(), os.environ.get(FAULT_ENV, "").strip()
    if not crash and not fault:
        return None
    plan: dict = {"crash": {}, "oserror": {}, "numeric": {}}
    for entry in filter(None, (e.strip() for e in crash.split(","))):
        point, n = _point_and_count(entry, CRASH_ENV)
        plan["crash"][point] = n
    for entry in filter(None, (e.strip() for e in fault.split(","))):
        kind, _, rest = entry.partition(":")
        if kind in _NUMERIC:
            plan["numeric"][kind] = _count(rest, entry, FAULT_ENV)
        elif kind in _OS_ERRORS:
            point, n = _point_and_count(rest, FAULT_ENV)
            plan["oserror"][point] = (_OS_ERRORS[kind], n)
        else:
            raise ValueError(f"{FAULT_ENV}: unknown fault {entry!r}")
    return plan


def _point_and_count(entry: str, env: str) -> tuple[str, int]:
    point, _, n = entry.rpartition(":")
    if point not in POINTS:
        raise ValueError(f"{env}: unknown point {point!r} in {entry!r}; points: {', '.join(POINTS)}")
    return point, _count(n, entry, env)


def _count(text: str, entry: str, env: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{env}: {entry!r} needs a positive count after ':'")
    return int(text)


def reset() -> None:
    """Re-read the environment and forget the hit counts (for in-process tests)."""
    global _plan
    _plan = _parse()
    _hits.clear()


def point(name: str, path: str | os.PathLike | None = None) -> None:
    """A named moment: SIGKILL or raise here if the environment asks for it; otherwise nothing."""
    if _plan is None:
        return
    count = _hits[name] = _hits.get(name, 0) + 1
    if _plan["crash"].get(name) == count:
        os.kill(os.getpid(), signal.SIGKILL)
    planned = _plan["oserror"].get(name)
    if planned is not None and planned[1] == count:
        code = planned[0]
        raise OSError(code, os.strerror(code), None if path is None else os.fspath(path))


def loss(step: int, value):
    """The loss of ``step``, or that loss times NaN/inf when a numeric fault is planned for it."""
    if _plan is None:
        return value
    numeric = _plan["numeric"]
    if numeric.get("nan-loss") == step:
        return value * float("nan")
    if numeric.get("inf-loss") == step:
        return value * float("inf")
    return value


def grads(step: int, params: Iterable) -> None:
    """Make one gradient of ``step`` NaN/inf when a numeric fault is planned for it."""
    if _plan is None:
        return
    numeric = _plan["numeric"]
    bad = float("nan") if numeric.get("nan-grad") == step else float("inf") if numeric.get("inf-grad") == step else None
    if bad is None:
        return
    for p in params:
        if p.grad is not None:
            p.grad.view(-1)[0] = bad
            return


reset()
