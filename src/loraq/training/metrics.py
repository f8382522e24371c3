"""Run metrics: memory readings, throughput, and ``metrics.jsonl``."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started its program: Linux's ``VmHWM``.

    Not ``ru_maxrss`` where ``VmHWM`` exists: Linux carries the parent's high-water mark across fork and exec
    into it, so a run started from a large process (a benchmark, a test) would report that process's peak.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    high_water = proc_kib_field("/proc/self/status", "VmHWM")
    if high_water is not None:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``key:  N kB`` line of a Linux /proc file (``/proc/self/status``, ``/proc/meminfo``); None
    where there is no such file or line."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """The number a user cares about: peak GPU memory on CUDA, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


class MetricsWriter:
    """Appends one JSON object per line; flushed every line so a crash loses nothing written."""

    def __init__(self, path: Path, enabled: bool = True, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if enabled and truncate_after_step is not None and self.path.exists():
            # on resume, lines past the checkpoint's step describe steps that will be redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= truncate_after_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record, default=float) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line: dropped


class Throughput:
    """Tokens per second over the steps since ``start`` (the first step, warm-up, is excluded once seen)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.steps = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1
        if self.steps == 1:  # the first step pays one-off costs (allocation, lazy init)
            self.t0 = time.perf_counter()
            self.tokens = 0

    def tokens_per_second(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 and self.tokens else 0.0
