"""Memory available here, and the largest batch and sequence length a plan fits into it.

Available memory on the CPU is the kernel's ``MemAvailable`` (page cache it
can drop included), capped by a cgroup limit when the process runs under one,
plus what this process already holds (the plan counts this process's own
framework memory too). On CUDA it is the device's free memory plus what this
process's caching allocator holds, less the CUDA context
(:data:`CUDA_CONTEXT_BYTES`), which ``max_memory_allocated`` does not count.

``--batch-size auto`` keeps :data:`AUTO_MARGIN` free: the plan's target is
to be within 15% of the measured peak (the table in bench/NOTES.md), so a
batch whose prediction plus 15% fits still fits when the prediction is
15% low.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

AUTO_MARGIN = 0.15
CUDA_CONTEXT_BYTES = 500_000_000


def available_bytes(device: str) -> int | None:
    """Bytes a run in this process could use on ``device`` ("cpu" or "cuda"); None when unknown here."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info()
        return max(0, free + torch.cuda.memory_reserved() - CUDA_CONTEXT_BYTES)
    host = _meminfo_available()
    if host is None:
        return None
    limit = _cgroup_room()
    room = host if limit is None else min(host, limit)
    from loraq.training.metrics import current_rss_bytes

    return room + current_rss_bytes()


def _meminfo_available() -> int | None:
    from loraq.training.metrics import proc_kib_field

    return proc_kib_field("/proc/meminfo", "MemAvailable")


def _cgroup_room() -> int | None:
    """limit - usage of this process's memory cgroup (v2, else v1), None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def largest_fitting(need: Callable[[int], int], budget: int, lo: int, hi: int) -> int | None:
    """The largest ``x`` in ``[lo, hi]`` with ``need(x) <= budget`` (``need`` grows with ``x``, but for a step
    down where the CPU heap term's tensors pass glibc's 32 MiB: the search may then stop below it, on the safe
    side); None if not even ``lo`` fits."""
    if need(lo) > budget:
        return None
    good, step = lo, 1
    while good + step <= hi and need(good + step) <= budget:  # gallop, then bisect
        good, step = good + step, step * 2
    bad = min(good + step, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if need(mid) <= budget else (good, mid)
    return good


def with_margin(peak: int) -> int:
    return int(peak * (1 + AUTO_MARGIN))

