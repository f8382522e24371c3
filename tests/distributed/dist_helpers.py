"""Helpers for multi-process tests: 2 ranks on gloo, one thread each, the tiny random Llama.

The reference for a multi-process run is always a run that takes another
code path: one process accumulating the same micro-batches, or the model
before it was wrapped. The generated kernels are off in every process here
(``LORAQ_COMPILE=0``, as in tests/distributed/test_fsdp.py): each rank would
trace them anew at start-up, and what these tests hold is the ranks' agreement;
the kernels are held to their references in tests/kernels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file

RANK_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "LORAQ_COMPILE": "0"}


def settings(model: Path, data: Path, out: Path, **overrides) -> dict:
    """What every run here shares (fp32, seed 0, LoRA without dropout, 3 steps), then ``overrides`` (None: unset)."""
    values = dict(model=str(model), data=str(data), output_dir=str(out), method="lora", max_steps=3, batch_size=2,
                  seq_len=64, dtype="fp32", eval_samples=0, seed=0, lr=1e-2, threads=1, dropout=0.0)
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def base_args(model: Path, data: Path, out: Path, **overrides) -> list[str]:
    """:func:`settings` as ``loraq train`` flags."""
    args = []
    for key, value in settings(model, data, out, **overrides).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def train_in_process(model: Path, data: Path, out: Path, **overrides):
    """The one-process reference, through the Python API (``loraq train`` is a thin layer over it)."""
    import loraq

    with mock.patch.dict(os.environ, LORAQ_COMPILE=RANK_ENV["LORAQ_COMPILE"]):  # the ranks' code paths
        return loraq.train(**settings(model, data, out, **overrides))


def loraq_cli(args: list[str], env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m loraq <args>`` in a fresh process (each rank of a --nproc run gets one thread)."""
    full_env = dict(os.environ, **RANK_ENV)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "loraq", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"loraq {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def torchrun(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 <args>``, checked."""
    full_env = dict(os.environ, **RANK_ENV)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def weights(run_dir: Path, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / name))


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of |a - b| / |a| (Frobenius norms): one number for "the same weights"."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30)) for k in a)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=rtol * float(a[k].abs().max()), msg=k)


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]
