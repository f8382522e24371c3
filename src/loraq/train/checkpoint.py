"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``<run>/checkpoints/step-00000042/`` holding

* ``trainable.safetensors`` -- every trainable parameter, by name, in its master dtype;
* ``optimizer.safetensors`` + the ``optimizer`` entry of ``state.json`` -- AdamW's
  moments and step counts keyed by parameter name, and its param groups;
* ``rng.safetensors`` -- torch CPU (and CUDA) generator states;
* ``state.json`` -- step, data position, scheduler, Python RNG, counters, and
  ``"complete": true`` written last;
* optionally an ``adapter/`` folder in PEFT format, for users.

No pickle anywhere. The folder is written under a temporary name, fsynced and
renamed (:func:`loraq.paths.atomic_dir`), so a checkpoint either exists whole or
not at all; one that is nevertheless unreadable (a disk error, a hand edit) is
skipped on resume with a warning, never loaded.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


def optimizer_from_files(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    index = {n: i for i, n in names.items()}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pname, field = key.rsplit("/", 1)
        if pname not in index:
            raise KeyError(f"optimizer state for unknown parameter {pname}")
        state.setdefault(index[pname], {})[field] = value
    for pname, fields in meta.get("scalars", {}).items():
        state.setdefault(index[pname], {}).update(fields)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], python_state: Any) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


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
                    scheduler: Any, state: dict[str, Any], write_extra: Callable[[Path], None] | None = None,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step-<step>`` atomically, then drop all but the newest ``keep``."""
    final = checkpoint_root(run_dir) / checkpoint_name(step)
    names = param_index_names(model, optimizer)
    with atomic_dir(final, replace=True) as tmp:
        save_file({n: p.detach().contiguous() for n, p in _trainable(model).items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer_to_files(optimizer, names)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        if write_extra is not None:
            write_extra(tmp)
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        full_state = {**state, "step": step, "optimizer": opt_meta, "scheduler": sched,
                      "python_rng": random.getstate(), "complete": True}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1, default=_json_default) + "\n")
    prune_checkpoints(run_dir, keep)
    return final


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


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> LoadedCheckpoint:
    """Read everything first, then apply: a corrupt file leaves model and optimizer untouched."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if not state.get("complete"):
        raise ValueError("state.json is not marked complete")
    trainable = load_file(str(path / "trainable.safetensors"))
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    rng = load_file(str(path / "rng.safetensors"))
    params = _trainable(model)
    if set(trainable) != set(params):
        missing = sorted(set(params) - set(trainable))[:3]
        extra = sorted(set(trainable) - set(params))[:3]
        raise ValueError(f"trainable parameters differ from this run (missing {missing}, unexpected {extra})")
    for name, p in params.items():
        if trainable[name].shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(trainable[name].shape)} in checkpoint, {tuple(p.shape)} in model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name])
    optimizer_from_files(optimizer, param_index_names(model, optimizer), opt_tensors, state["optimizer"])
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    restore_rng(rng, state.get("python_rng"))
    return LoadedCheckpoint(step=int(state["step"]), path=path, state=state)


def resume_latest(run_dir: Path, *, model, optimizer, scheduler, warn: Callable[[str], None]) -> LoadedCheckpoint | None:
    """Load the newest checkpoint that reads back whole; skip (and warn about) broken ones."""
    for step, path in list_checkpoints(run_dir):
        try:
            return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
        except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError, RuntimeError) as exc:
            warn(f"skipping checkpoint {path.name}: unreadable ({type(exc).__name__}: {str(exc)[:120]})")
    return None
