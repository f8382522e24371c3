"""Helpers for the reliability suite: run `loraq` as a user would, kill it, and look at what it left.

A module of its own (``conftest`` is not importable by name reliably).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

# one thread per process: the suite runs on shared 2-core machines, and one thread is also what makes
# CPU fp32 training bitwise reproducible across processes. The generated kernels are off (LORAQ_COMPILE=0):
# these tests are about processes, files and signals, and tracing the kernels anew in each of their ~40
# processes cost ~1.5 s each; the kernels are held to their references in tests/kernels and trained through
# in tests/training.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LORAQ_COMPILE": "0"}


def loraq_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORAQ_CRASH_AT", "LORAQ_FAULT")}
    env.update(QUIET_ENV)
    env.update(extra)
    return env


def loraq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraq", *map(str, args)]


def run_loraq(args, *, env: dict | None = None, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(loraq_cmd(*args), env=env or loraq_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def start_loraq(args, *, env: dict | None = None, cwd=None) -> subprocess.Popen:
    return subprocess.Popen(loraq_cmd(*args), env=env or loraq_env(), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def killed_by_sigkill(proc) -> bool:
    return proc.returncode == -signal.SIGKILL


def train_steps_logged(run_dir: Path) -> list[int]:
    """The ``step`` of every complete train line of metrics.jsonl, in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return steps


def kill_when_step_logged(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> int:
    """SIGKILL ``proc`` as soon as metrics.jsonl shows ``step``: wherever the run happens to be then.

    Returns the last step logged at the moment of the kill. Fails if the run
    ends (or times out) before reaching ``step``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before step {step}: "
                                 f"{proc.stderr.read()[-2000:]}")
        steps = train_steps_logged(run_dir)
        if steps and steps[-1] >= step:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return steps[-1]
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def tree_snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every file and folder under ``root``: path -> (kind, size, mtime_ns, sha256) -- what "unchanged" means."""
    root = Path(root)
    snap: dict[str, tuple] = {}
    if not root.exists():
        return snap
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if any(rel_dir == s or rel_dir.startswith(s + os.sep) for s in skip):
            dirnames[:] = []
            continue
        for d in dirnames:
            snap[os.path.normpath(os.path.join(rel_dir, d))] = ("dir",)
        for f in filenames:
            p = Path(dirpath) / f
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            snap[os.path.normpath(os.path.join(rel_dir, f))] = ("file", st.st_size, st.st_mtime_ns, digest)
    return snap


def snapshot_diff(before: dict, after: dict) -> list[str]:
    changes = [f"removed {k}" for k in before if k not in after]
    changes += [f"added {k}" for k in after if k not in before]
    changes += [f"changed {k}" for k in before if k in after and before[k] != after[k]]
    return sorted(changes)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr is exactly one line, ``loraq: error: ...``, holding every needle, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n" + "\n".join(lines[:20])
    line = lines[0]
    assert line.startswith("loraq: error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def write_chat_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "fox", "one", "two", "three", "sun", "moon"]
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.choice(words), rng.choice(words)
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Join {a} and {b}."},
                                              {"role": "assistant", "content": f"{a}-{b}"}]}) + "\n")
    return Path(path)
