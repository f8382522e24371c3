"""The run folder: where it is, whether it may be used, and what it records.

Rules (nothing of the user's is overwritten without being asked):

* a missing or empty folder is used as is;
* a non-empty folder needs ``--resume`` (continue it) or ``--overwrite``
  (replace it); ``--overwrite`` only replaces a folder that loraq made
  (it holds ``run.json``), never an arbitrary directory, and never one that
  holds the run's own model or data; the old run is deleted only once the
  new one's model and data have loaded (:func:`clear_run_dir`), so a mistake
  in them costs nothing;
* ``--resume`` needs a loraq run folder whose settings match this run's; a
  missing or empty folder (a run killed before it wrote anything) starts anew;
* a run that stops on an error before writing anything leaves no folder behind;
* one process at a time: a run holds an flock on its folder (released when
  the process ends, however it ends; no file is made for it); a second loraq
  process on the same folder is a one-line error.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from loraq.config import TrainConfig
from loraq.errors import ConfigError
from loraq.outputs import check_output_folder
from loraq.paths import atomic_write_text

RUN_FILE = "run.json"

# settings that must not change between a run and its resumption
RESUME_MUST_MATCH = ("model", "method", "dtype", "quant", "double_quant", "blocksize", "rank", "alpha", "dropout",
                     "target_modules", "exclude_modules", "layers_to_transform", "rank_pattern", "alpha_pattern",
                     "modules_to_save", "rslora", "dora", "init", "data", "format", "seq_len", "packing",
                     "train_on_inputs", "batch_size", "grad_accum", "lr", "loraplus_lr_ratio", "embedding_lr", "warmup",
                     "schedule", "weight_decay", "seed", "val_data", "val_fraction")


def default_run_name(cfg: TrainConfig, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now()
    data = Path(cfg.data).stem if cfg.data else "demo"
    data = re.sub(r"[^A-Za-z0-9_.-]+", "-", data)[:40] or "data"
    return f"{cfg.method}-{data}-{now:%Y%m%d-%H%M%S}"


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    return Path("runs") / (cfg.name or default_run_name(cfg))


def prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> str:
    """Check the folder against --resume/--overwrite; returns 'new', 'resume' or 'overwrite'."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output-dir {run_dir} is a file, not a folder; choose another path")
    non_empty = run_dir.is_dir() and any(run_dir.iterdir())
    is_run = (run_dir / RUN_FILE).is_file()
    if cfg.resume or cfg.auto_resume:
        if cfg.auto_resume and not non_empty:
            return "new"  # killed before it wrote anything: nothing to continue, so start
        if not non_empty:
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume; drop --resume to start a new run "
                              "there (--auto-resume: resume when there is one, start otherwise)")
        flag = "--resume" if cfg.resume else "--auto-resume"
        if not is_run:
            raise ConfigError(f"{flag}: {run_dir} holds no loraq run (no {RUN_FILE}); "
                              f"drop {flag} to start a new run there")
        check_resume_matches(run_dir, cfg)
        return "resume"
    if non_empty and not cfg.overwrite:
        raise ConfigError(f"--output-dir {run_dir} exists and is not empty; pass --resume to continue it, "
                          "--overwrite to replace it, or choose another folder")
    if check_output_folder(run_dir, cfg.overwrite, flag="--output-dir", marker=RUN_FILE):
        for flag, value in (("--data", cfg.data), ("--val-data", cfg.val_data), ("--model", cfg.model)):
            if value and _inside(Path(value), run_dir):
                raise ConfigError(f"--overwrite would delete {flag} {value}, which is inside --output-dir {run_dir}; "
                                  "move it out or choose another --output-dir")
        return "overwrite"
    return "new"


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.expanduser().resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def clear_run_dir(folder: Path) -> None:
    """Empty an ``--overwrite`` run folder (call it once the new run's model and data have loaded)."""
    for child in Path(folder).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class RunLock:
    """This process's hold on a run folder; ``close()`` (or the process ending) lets it go."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close


def lock_run_dir(run_dir: Path) -> RunLock:
    """Hold ``run_dir`` (created if missing) for this process: an exclusive flock on the folder itself.

    A folder another loraq process holds is a ConfigError naming it. On a
    filesystem without flock (some network mounts) the run goes on unguarded.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"--output-dir {run_dir} is in use by another loraq process; wait for it to end or "
                          "choose another --output-dir") from None
    except OSError:
        pass
    return RunLock(fd)


def check_something_to_resume(run_dir: Path, cfg: TrainConfig) -> None:
    """``--resume`` (not ``--auto-resume``) needs a checkpoint in the run folder, as Hugging Face's Trainer does."""
    from loraq.training.checkpoint import list_checkpoints

    if cfg.resume and not list_checkpoints(run_dir):
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume; pass --overwrite instead to start "
                          "it again (--auto-resume: resume when there is one, start otherwise)")


def check_resume_matches(run_dir: Path, cfg: TrainConfig) -> None:
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"--resume: {run_dir / RUN_FILE} is unreadable; "
                          "start a new run with another --output-dir") from None
    current = cfg.to_dict()
    for key in RESUME_MUST_MATCH:
        if key in saved and _norm(saved[key]) != _norm(current.get(key)):
            raise ConfigError(f"--resume: --{key.replace('_', '-')} was {saved[key]!r} in this run and is "
                              f"{current.get(key)!r} now; resume with the same settings or start a new run")


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def write_run_file(run_dir: Path, cfg: TrainConfig, extra: dict[str, Any]) -> None:
    from loraq import __version__

    record = {"loraq_version": __version__, "config": cfg.to_dict(), **extra,
              "started": _dt.datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(record, indent=2, default=str) + "\n")


def check_writable(run_dir: Path) -> None:
    """Fail before hours of training, not after: the folder must accept files.

    A folder (and parents) created for the test is removed again: the run
    creates it when it writes its first file, so an error before then leaves
    nothing behind.
    """
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    probe = run_dir / f".loraq-write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output-dir {run_dir} is not writable ({exc.strerror}); "
                          "choose a folder you can write to") from None
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
