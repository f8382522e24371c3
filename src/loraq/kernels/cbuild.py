"""A C source built into a shared library on first use, with the system compiler, and kept in loraq's cache.

``cc -O3 <flags> -fopenmp -shared -fPIC`` (``CC`` may name another compiler) writes
``<cache>/native/<name>-<key>.so``, where the key hashes the source, the compiler and its ``--version``, the
flags, the machine and the CPU's flags: another source, compiler, flag or CPU builds anew, the same ones load
what is there. The library is written under a temporary name and renamed into place, so processes building the
same one at once each finish with the same bytes. Loaded with ctypes; each exported function's return and
argument types are set from a table. :class:`LazyLibrary` builds once per process, where kernels are on
(``LORAQ_COMPILE``) and on Linux, and logs one warning where it cannot (the caller then runs another path).
OpenMP: linked against the ``libgomp`` the compiler ships, the one PyTorch's Linux wheels load.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import threading
from collections.abc import Mapping, Sequence

from loraq.kernels.compile import enabled

# exported function name -> (restype, argtypes)
Signatures = Mapping[str, tuple[object, Sequence[object]]]
NATIVE = ("-march=native",)


def cpu_flags() -> str:
    """The CPU's feature flags (/proc/cpuinfo), or the processor's name where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def build(name: str, source: str, flags: Sequence[str], signatures: Signatures) -> ctypes.CDLL:
    """Compile ``source`` (once per source, compiler, flags and CPU) into loraq's cache and load it."""
    from loraq.paths import cache_dir

    compiler = shlex.split(os.environ.get("CC", "cc"))
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    key = hashlib.sha256("\0".join([source, *compiler, version, *flags, platform.machine(), cpu_flags()]).encode())
    folder = cache_dir() / "native"
    target = folder / f"{name}-{key.hexdigest()[:24]}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        source_file = target.with_suffix(f".{os.getpid()}.c")
        partial = target.with_suffix(f".{os.getpid()}.so")
        source_file.write_text(source)
        try:
            subprocess.run([*compiler, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", str(source_file),
                            "-o", str(partial)], capture_output=True, text=True, timeout=300, check=True)
            os.replace(partial, target)  # atomic: a concurrent build writes the same bytes
        finally:
            source_file.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(target))
    for function, (restype, argtypes) in signatures.items():
        fn = getattr(lib, function)
        fn.restype = restype
        fn.argtypes = list(argtypes)
    return lib


class LazyLibrary:
    """One C library of loraq's, built the first time it is asked for.

    ``flags``: compiler flags every build of it takes (``-ffp-contract=off`` ...), after the target's
    (``-march=native`` by default). ``what`` names it and ``instead`` says what runs without it, in the one
    warning ``log`` gets where it cannot be built.
    """

    def __init__(self, name: str, source: str, signatures: Signatures, flags: Sequence[str], what: str,
                 instead: str, log: logging.Logger):
        self.name, self.source, self.signatures, self.flags = name, source, signatures, tuple(flags)
        self.what, self.instead, self.log = what, instead, log
        self.lib: ctypes.CDLL | None = None
        self.tried = False
        self._lock = threading.Lock()

    def build(self, target: Sequence[str] = NATIVE) -> ctypes.CDLL:
        """Build (or load the cached build) for ``target``'s flags, e.g. ``("-march=x86-64",)``; raises on failure."""
        return build(self.name, self.source, (*target, *self.flags), self.signatures)

    def get(self) -> ctypes.CDLL | None:
        """The library for this CPU, or None where it cannot be built (logged once) or kernels are switched off."""
        if not enabled() or platform.system() != "Linux":
            return None
        if not self.tried:
            with self._lock:
                if not self.tried:
                    self.lib = self._try_build()
                    self.tried = True
        return self.lib

    def _try_build(self) -> ctypes.CDLL | None:
        try:
            return self.build()
        except Exception as exc:  # no compiler, no OpenMP, a read-only cache: the other paths still work
            detail = (getattr(exc, "stderr", "") or str(exc)).strip()
            self.log.warning("loraq: %s unavailable (%s: %s); %s", self.what, type(exc).__name__,
                             detail.splitlines()[0][:200] if detail else "", self.instead)
            return None
