"""The probe's measurements kept on disk, so a model class and run settings are probed once per machine.

A probe (:mod:`loraq.planning.probe`) costs about a second of fake-tensor
forwards; ``loraq train`` plans every run before loading, and the same model
is trained again and again. Its results are a pure function of the model's
``config.json``, the run's settings and the code that ran (loraq, torch,
transformers), so they are kept as small JSON files::

    <cache>/plans/<key>.json     key = sha256(config.json, the run's settings, the code's versions)

The code's version for loraq is the size and modification time of each of
its source files: an edited kernel is probed afresh. A file that cannot be
read or written is ignored (the probe runs again); ``LORAQ_PLAN_CACHE=0``
turns it off.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = 1


def enabled() -> bool:
    return os.environ.get("LORAQ_PLAN_CACHE", "1") != "0"


def record_key(folder: str, run_repr: str) -> str | None:
    """The key of ``run_repr`` (the run's settings, the model's own path left out) on the model in ``folder``."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    parts = [FORMAT, json.dumps(config, sort_keys=True), run_repr, _code_version()]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:32]


def read(key: str | None) -> dict[str, Any]:
    if key is None or not enabled():
        return {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(_path(key).read_text(encoding="utf-8"))
        if isinstance(record, dict):
            return record
    return {}


def write(key: str | None, record: dict[str, Any]) -> None:
    if key is None or not enabled():
        return
    from loraq.paths import atomic_write_text

    with contextlib.suppress(OSError):
        atomic_write_text(_path(key), json.dumps(record))


def _path(key: str) -> Path:
    from loraq.paths import cache_dir

    return cache_dir() / "plans" / f"{key}.json"


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    import torch
    import transformers

    import loraq

    root = Path(loraq.__file__).parent
    files = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*.py"))
    return json.dumps([torch.__version__, transformers.__version__, files])
