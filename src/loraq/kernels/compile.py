"""torch.compile (Inductor) for small pure functions, with the eager function as the fallback.

Each function is compiled once, with dynamic shapes, the first time it is
called on the CPU; the generated code is cached under loraq's cache
(``TORCHINDUCTOR_CACHE_DIR``, set when loraq is imported). Where Inductor cannot build (no C++ compiler,
an unsupported platform) or ``LORAQ_COMPILE=0``, the eager function runs; a
build failure is logged once and never retried. The generated kernels
compute the same operations as the eager functions (tests hold them equal).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
_lock = threading.Lock()
_cache: dict[str, Callable] = {}
_broken = False


def enabled() -> bool:
    return not _broken and os.environ.get("LORAQ_COMPILE", "1").lower() not in {"0", "false", "no", "off"}


def compiled(name: str, fn: Callable) -> Callable:
    """``fn`` compiled (guarded: the first failure switches every kernel back to eager)."""
    if not enabled():
        return fn
    with _lock:
        wrapped = _cache.get(name)
        if wrapped is None:
            wrapped = _cache[name] = _guarded(name, fn)
    return wrapped


def _guarded(name: str, fn: Callable) -> Callable:
    try:
        import torch
        import torch._inductor.config as inductor_config

        # precompiled headers always go to the system temp dir, whatever the cache dir; loraq writes only to its
        # run folder and its cache, so do without them
        inductor_config.cpp_cache_precompile_headers = False
        fast = torch.compile(fn, dynamic=True)
    except Exception as exc:
        _disable(name, exc)
        return fn

    def call(*args, **kwargs):
        if _broken or not enabled():
            return fn(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except Exception as exc:  # the toolchain failed at first build: eager from now on
            _disable(name, exc)
            return fn(*args, **kwargs)

    return call


def _disable(name: str, exc: BaseException) -> None:
    global _broken
    _broken = True
    log.warning("loraq: generated kernels unavailable (%s: %s: %s); using eager PyTorch", name, type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "")
