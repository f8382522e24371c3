"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``<run>/checkpoints/step-00000042/`` holding

* ``trainable.safetensors`` -- every trainable parameter, by name, in its master dtype;
* ``optimizer.safetensors`` + the ``optimizer`` entry of ``state.json`` -- AdamW's
  moments and step counts keyed by parameter name, and its param groups;
* ``rng.safetensors`` -- torch CPU (and CUDA) generator states;
* ``state.json`` -- step, data position, scheduler, Python RNG, counters, and
  ``"complete": true`` written last.

No pickle anywhere. The folder is written under a temporary name, each
safetensors file read back, everything fsynced, then renamed
(:func:`loraq.paths.atomic_dir`), so a checkpoint either exists whole or not at
all; one that is nevertheless unreadable (a disk error, a hand edit) is skipped
on resume with a warning, never loaded: every file is read and checked against
the run before the first value is applied, so a bad checkpoint leaves the
model, optimizer, schedule and RNG exactly as they were and the next older one
is tried. A write that fails (disk full, read-only folder) is an
:class:`~loraq.errors.OutputError` naming the folder; the temporary folder is
removed and the previous checkpoints are untouched.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LRScheduler

from loraq import faults
from loraq.data.batches import BatchIterator
from loraq.errors import LoraqError, OutputError
from loraq.paths import atomic_dir

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders, newest first (temporary folders are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def optimizer_to_files(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as flat tensors keyed ``<param name>/<field>`` plus JSON-able groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        pname = names[idx]
        for field, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pname}/{field}"] = value.detach().contiguous()
            else:
                scalars.setdefault(pname, {})[field] = value
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        g["params"] = [names[i] for i in g["params"]]
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def param_index_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The optimizer's integer parameter ids mapped to the model's parameter names."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            names[i] = by_id[id(p)]
            i += 1
    return names


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler, state: dict[str, Any], write_extra: Callable[[Path], None] | None = None,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step-<step>`` atomically, then drop all but the newest ``keep``.

    A failed write is an :class:`OutputError` naming the folder and the last
    good checkpoint, which is left as it was.
    """
    final = checkpoint_root(run_dir) / checkpoint_name(step)
    names = param_index_names(model, optimizer)
    try:
        remove_stale_temporaries(run_dir)
        with atomic_dir(final, replace=True) as tmp:
            _save_tensors({n: p.detach().contiguous() for n, p in _trainable(model).items()},
                          tmp / "trainable.safetensors")
            opt_tensors, opt_meta = optimizer_to_files(optimizer, names)
            _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
            faults.point("checkpoint-write", tmp)
            _save_tensors(rng_tensors(), tmp / "rng.safetensors")
            if write_extra is not None:
                write_extra(tmp)
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            full_state = {**state, "step": step, "optimizer": opt_meta, "scheduler": sched,
                          "python_rng": random.getstate(), "complete": True}
            (tmp / "state.json").write_text(json.dumps(full_state, indent=1, default=_json_default) + "\n")
        faults.point("checkpoint-renamed", final)
    except (OSError, SafetensorError) as exc:
        error = output_error(exc, run_dir, f"checkpoint {final.name}")
        if error is None:
            raise
        raise error from None
    prune_checkpoints(run_dir, keep)
    faults.point("checkpoint-saved", final)
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file``, then read the header back: a write the OS cut short must not pass for a checkpoint."""
    save_file(tensors, str(path))
    try:
        with safe_open(str(path), "pt") as fh:  # checks the file covers every tensor the header lists
            complete = set(fh.keys()) == set(tensors)
    except SafetensorError:
        complete = False
    if not complete:
        raise OSError(errno.EIO, "a file read back incomplete (is the disk full?)", str(path))


@contextlib.contextmanager
def writing(run_dir: Path, what: str):
    """Turn a failed write of ``what`` in ``run_dir`` (disk full, read-only, ...) into an OutputError."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        error = output_error(exc, run_dir, what)
        if error is None:
            raise
        raise error from None


# errno values that mean "this folder cannot take the files", as opposed to a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def output_error(exc: BaseException, run_dir: Path, what: str) -> OutputError | None:
    """The one-line OutputError for a failed write in ``run_dir`` (None: not a write failure, a bug)."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors reports OS errors in its message: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code not in WRITE_ERRNOS:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space"
    elif code == errno.EIO:
        fix = "check the disk"
    else:
        fix = "make the folder writable"
    done = list_checkpoints(run_dir)
    last = (f"the last good checkpoint, {done[0][1].name}, is intact: {fix}, then run again with --resume"
            if done else f"no checkpoint was written yet: {fix} or choose another --output-dir")
    reason = getattr(exc, "strerror", None) or os.strerror(code)
    return OutputError(f"cannot write {what} in {run_dir}: {reason}; {last}")


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary folders a killed process left behind (never a complete checkpoint)."""
    root = checkpoint_root(run_dir)
    leftovers = list(root.glob(".step-*.tmp-*")) + list(root.glob(".step-*.old-*")) if root.is_dir() else []
    leftovers += list(Path(run_dir).glob(".final-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _json_default(obj: Any):
    if isinstance(obj, tuple):
        return list(obj)
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for _, path in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    step: int
    path: Path
    state: dict[str, Any]


def read_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                    data: BatchIterator | None = None) -> Callable[[], LoadedCheckpoint]:
    """Read and check everything first; returns the function that applies it (a bad checkpoint changes nothing).

    ``data`` (optional) is the batch iterator, whose position is restored too.
    Anything unreadable or inconsistent raises (ValueError, OSError, ...)
    before the first value is applied; a LoraqError (the data position belongs
    to other settings) is the user's to fix and is not a damaged file.
    """
    path = Path(path)
    state, step = _read_state(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    rng = load_file(str(path / "rng.safetensors"))
    for extra in path.glob("*.safetensors"):  # files others add (write_extra, e.g. per-rank RNG) must read back too
        if extra.name not in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
            with safe_open(str(extra), "pt") as fh:
                fh.keys()
    params = _trainable(model)
    if set(trainable) != set(params):
        missing = sorted(set(params) - set(trainable))[:3]
        extra = sorted(set(trainable) - set(params))[:3]
        raise ValueError(f"trainable parameters differ from this run (missing {missing}, unexpected {extra})")
    for name, p in params.items():
        if trainable[name].shape != p.shape or trainable[name].dtype != p.dtype:
            raise ValueError(f"{name}: {trainable[name].dtype} {tuple(trainable[name].shape)} in checkpoint, "
                             f"{p.dtype} {tuple(p.shape)} in model")
    names = param_index_names(model, optimizer)
    opt_state = _optimizer_state(optimizer, names, opt_tensors, state["optimizer"], model)
    sched = _scheduler_state(scheduler, state["scheduler"])
    python_rng = _python_rng_state(state.get("python_rng"))
    _check_rng(rng)
    for key, kind in (("counters", dict), ("scaler", dict)):
        if state.get(key) is not None and not isinstance(state[key], kind):
            raise ValueError(f"state.json: {key} is not a {kind.__name__}")
    if data is not None:
        if not isinstance(state.get("data"), dict) or not all(isinstance(state["data"].get(k), int)
                                                              for k in ("epoch", "index")):
            raise ValueError("state.json: the data position is missing or malformed")
        copy.copy(data).load_state_dict(state["data"])  # a dry run: raises DataError for other data/settings

    def apply() -> LoadedCheckpoint:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trainable[name])
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched)
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        if python_rng is not None:
            random.setstate(python_rng)
        if data is not None:
            data.load_state_dict(state["data"])
        return LoadedCheckpoint(step=step, path=path, state=state)

    return apply


def _read_state(path: Path) -> tuple[dict[str, Any], int]:
    """state.json, complete and naming the step of its folder."""
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or state.get("complete") is not True:
        raise ValueError("state.json is not marked complete")
    step = state.get("step")
    m = _STEP_DIR.match(path.name)
    if not isinstance(step, int) or (m is not None and int(m.group(1)) != step):
        raise ValueError(f"state.json gives step {step!r} for folder {path.name}")
    return state, step


def _optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                     meta: Any, model: torch.nn.Module) -> dict:
    """The optimizer state dict the files describe, checked against this optimizer's parameters."""
    index = {n: i for i, n in names.items()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pname, _, field = key.rpartition("/")
        if pname not in index:
            raise ValueError(f"optimizer state for unknown parameter {pname}")
        if value.dim() > 0 and value.shape != shapes[pname]:
            raise ValueError(f"optimizer {key}: shape {tuple(value.shape)}, parameter {tuple(shapes[pname])}")
        state.setdefault(index[pname], {})[field] = value
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise ValueError("state.json: optimizer param_groups missing")
    for pname, fields in meta.get("scalars", {}).items():
        if pname not in index or not isinstance(fields, dict):
            raise ValueError(f"optimizer scalars for unknown parameter {pname}")
        state.setdefault(index[pname], {}).update(fields)
    current = optimizer.state_dict()["param_groups"]
    if len(meta["param_groups"]) != len(current):
        raise ValueError(f"{len(meta['param_groups'])} optimizer groups in checkpoint, {len(current)} now")
    groups = []
    for saved, now in zip(meta["param_groups"], current):
        g = dict(saved)
        if [index.get(n) for n in g.get("params", [])] != now["params"]:
            raise ValueError("optimizer groups hold other parameters than this run's")
        g["params"] = list(now["params"])
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        for key, value in now.items():
            got = g.get(key, value)
            if key != "params" and value is not None and type(got) is not type(value) \
                    and not (isinstance(value, float) and type(got) is int):
                raise ValueError(f"optimizer group setting {key!r} is {g.get(key)!r}")
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _scheduler_state(scheduler: LRScheduler, saved: Any) -> dict:
    current = scheduler.state_dict()
    if not isinstance(saved, dict):
        raise ValueError("state.json: scheduler is not a mapping")
    for key, value in saved.items():
        if key not in current or (current[key] is not None and type(value) is not type(current[key])
                                  and not (isinstance(current[key], float) and isinstance(value, int))):
            raise ValueError(f"state.json: scheduler {key!r} is {value!r}")
    merged = dict(current)
    merged.update(saved)
    return merged


def _python_rng_state(saved: Any) -> tuple | None:
    if saved is None:
        return None
    try:
        version, internal, gauss = saved
        state = (version, tuple(internal), gauss)
        random.Random().setstate(state)  # a scratch generator: raises for a malformed state
    except (TypeError, ValueError) as exc:
        raise ValueError(f"state.json: python_rng is malformed ({exc})") from None
    return state


def _check_rng(tensors: dict[str, torch.Tensor]) -> None:
    now = torch.get_rng_state()
    cpu = tensors.get("torch_cpu")
    if cpu is None or cpu.dtype != now.dtype or cpu.shape != now.shape:
        raise ValueError("rng.safetensors: the CPU generator state is missing or malformed")


def resume_latest(run_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: LRScheduler, warn: Callable[[str], None],
                  data: BatchIterator | None = None) -> LoadedCheckpoint | None:
    """Load the newest checkpoint that reads back whole; skip (and warn about) broken ones."""
    for _step, path in list_checkpoints(run_dir):
        try:
            apply = read_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, data=data)
        except LoraqError:
            raise
        except Exception as exc:  # any damage (truncated file, garbled JSON, wrong shapes): nothing was applied
            reason = " ".join(str(exc).split())[:160]
            warn(f"skipping checkpoint {path.name}: unreadable ({type(exc).__name__}: {reason})")
            continue
        return apply()
    return None
