"""The real llama.cpp for tests and benchmarks: node-llama-cpp, installed once into loraq's cache.

``ensure_node_llama_cpp()`` installs the npm package ``node-llama-cpp`` (pinned,
with its prebuilt CPU binary for this platform) into
``<loraq cache>/llama-cpp-node/<version>``: under a file lock (two test
processes install once), into a temporary folder renamed into place (a killed
install leaves nothing a later run would take), and only when that folder is
missing (idempotent). Never into the repository.

``run_llama_cpp(models)`` runs ``llama_cpp_runner.mjs`` once for a whole batch
of models and tasks (one node process: llama.cpp's start-up and thread pool
are paid once) and returns its results; see the runner for the task kinds.
llama.cpp's worker threads spin while they wait, so keep it off a machine busy
with other heavy work (``LORAQ_LLAMA_THREADS`` sets its thread count, default 1).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from loraq.paths import atomic_dir, atomic_write_bytes, cache_dir, file_lock

NODE_LLAMA_CPP_VERSION = "3.21.1"
RUNNER = Path(__file__).with_name("llama_cpp_runner.mjs")
# (platform.system(), platform.machine()) -> node-llama-cpp's prebuilt binary package for it
_PREBUILT = {("Linux", "x86_64"): "linux-x64", ("Linux", "aarch64"): "linux-arm64",
             ("Darwin", "arm64"): "mac-arm64-metal", ("Darwin", "x86_64"): "mac-x64", ("Windows", "AMD64"): "win-x64"}


def node_missing_reason() -> str | None:
    """Why the real llama.cpp cannot run here (no Node.js / npm), or None."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not found: the checks in the real llama.cpp need Node.js >= 18 "
                f"(node-llama-cpp {NODE_LLAMA_CPP_VERSION} is installed from npm on first use)")
    return None


def install_dir() -> Path:
    return cache_dir() / "llama-cpp-node" / NODE_LLAMA_CPP_VERSION


def _installed(folder: Path) -> bool:
    package = folder / "node_modules" / "node-llama-cpp" / "package.json"
    try:
        return json.loads(package.read_text())["version"] == NODE_LLAMA_CPP_VERSION
    except (OSError, ValueError, KeyError):
        return False


def ensure_node_llama_cpp(timeout_s: float = 900) -> Path:
    """The folder holding ``node_modules/node-llama-cpp``, installed on first use (locked, atomic)."""
    final = install_dir()
    if _installed(final):
        return final
    with file_lock(final.parent / f".{final.name}.lock"):
        if _installed(final):
            return final
        with atomic_dir(final, replace=True) as tmp:
            packages = [f"node-llama-cpp@{NODE_LLAMA_CPP_VERSION}"]
            prebuilt = _PREBUILT.get((platform.system(), platform.machine()))
            # only this platform's binary: the CUDA/Vulkan/ARM variants are ~650 MB of the ~730 MB
            extra = [f"@node-llama-cpp/{prebuilt}@{NODE_LLAMA_CPP_VERSION}", "--omit=optional"] if prebuilt else []
            cmd = ["npm", "install", "--prefix", str(tmp), "--save-exact", "--no-audit", "--no-fund", *packages, *extra]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0 or not _installed(tmp):
                raise RuntimeError(f"npm install of node-llama-cpp failed ({done.returncode}): {done.stderr[-2000:]}")
    return final


def run_llama_cpp(models: list[dict[str, Any]], threads: int | None = None, timeout_s: float = 600) -> list[list[dict]]:
    """Run every model's tasks in one node process; ``result[i][j]`` answers ``models[i]["tasks"][j]``."""
    folder = ensure_node_llama_cpp()
    code = RUNNER.read_bytes()
    # ESM resolves node-llama-cpp next to the script, so the script runs from the install folder
    script = folder / f"loraq-runner-{hashlib.sha256(code).hexdigest()[:12]}.mjs"
    if not script.is_file():
        atomic_write_bytes(script, code)
    threads = threads or int(os.environ.get("LORAQ_LLAMA_THREADS", "1"))
    with tempfile.TemporaryDirectory(prefix="loraq-llama-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"threads": threads, "models": models}))
        done = subprocess.run(["node", str(script), str(job), str(result)], capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"llama.cpp runner failed ({done.returncode}): {done.stderr[-3000:]}")
        return json.loads(result.read_text())
