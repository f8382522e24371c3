"""``loraq train --nproc N``: relaunch the same run under torchrun.

The parent validates everything it can first (flags, the run folder), fixes
the run folder name, writes the settings to a recipe file, and starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m loraq
train <recipe>``. Each rank reads the same recipe; rank 0 writes the files.
A user mistake found by a rank comes back as the same one-line error here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from loraq.config import TrainConfig
from loraq.errors import LoraqError

ERROR_FILE_ENV = "LORAQ_ERROR_FILE"


def child_recipe(cfg: TrainConfig, run_dir: Path) -> dict:
    values = {k: v for k, v in cfg.to_dict().items() if k in cfg.explicit or k in ("output_dir",)}
    values["output_dir"] = str(run_dir)
    values.pop("nproc", None)
    return values


def launch_torchrun(cfg: TrainConfig):
    from loraq.train.loop import RunResult
    from loraq.train.rundir import prepare_run_dir, resolve_run_dir

    run_dir = resolve_run_dir(cfg).resolve()
    prepare_run_dir(run_dir, cfg)  # errors before any process starts; rank 0 empties an --overwrite folder later
    cfg_child = TrainConfig.from_dict(child_recipe(cfg, run_dir), source="launcher")
    cfg_child.resume = cfg.resume
    with tempfile.TemporaryDirectory(prefix="loraq-launch-") as tmp:
        recipe = Path(tmp) / "recipe.json"  # JSON is YAML: the child reads it as a recipe
        values = {k: getattr(cfg_child, k) for k in cfg_child.explicit}
        values["output_dir"] = str(run_dir)
        if cfg.resume:
            values["resume"] = True
        recipe.write_text(json.dumps(values))
        error_file = Path(tmp) / "error.txt"
        env = dict(os.environ, **{ERROR_FILE_ENV: str(error_file)})
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
               "-m", "loraq", "train", str(recipe)]
        proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            if error_file.exists():
                raise LoraqError(error_file.read_text().strip())
            sys.stderr.write(proc.stderr)
            raise RuntimeError(f"torchrun exited with code {proc.returncode}")
        _echo_rank0(proc.stderr)
    summary = json.loads((run_dir / "summary.json").read_text())
    return RunResult(run_dir=run_dir, summary=summary)


def _echo_rank0(stderr: str) -> None:
    """Pass the children's progress lines through, minus torchrun's own chatter."""
    for line in stderr.splitlines():
        if "torch.distributed" in line or line.startswith("W") and "OMP_NUM_THREADS" in line:
            continue
        sys.stderr.write(line + "\n")


def record_error_for_launcher(message: str) -> None:
    """Called by a rank's CLI on a LoraqError: the launcher re-raises it as one line."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path and (os.environ.get("RANK", "0") == "0" or not os.path.exists(path)):
        try:
            Path(path).write_text(message + "\n")
        except OSError:
            pass
