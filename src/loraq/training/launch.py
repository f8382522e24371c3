"""``loraq train --nproc N``: relaunch the same run under torchrun.

The parent validates everything it can first (flags, the run folder), fixes
the run folder name, writes the settings to a recipe file, and starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m loraq
train <recipe>``. Each rank reads the same recipe; rank 0 writes the files.

What the terminal shows is what one process would show: the ranks' stderr
comes through this process line by line, minus torchrun's own log lines; a
user mistake found by any rank (a LoraqError) is written to the file named by
``LORAQ_ERROR_FILE`` and comes back here as the same single line and exit
code 2, while the tracebacks that the other ranks and torchrun print as the
group falls apart are held back. A crash that is not a user mistake shows
everything.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from loraq.config import TrainConfig
from loraq.errors import LoraqError

ERROR_FILE_ENV = "LORAQ_ERROR_FILE"
LAUNCHED_ENV = "LORAQ_LAUNCHED"  # "1" in the ranks that `loraq train --nproc` started: the parent reports


def child_recipe(cfg: TrainConfig, run_dir: Path) -> dict:
    values = {k: v for k, v in cfg.to_dict().items() if k in cfg.explicit or k in ("output_dir",)}
    values["output_dir"] = str(run_dir)
    values.pop("nproc", None)
    return values


def threads_per_rank(cfg: TrainConfig) -> int:
    """--threads if given, else this machine's cores shared evenly among the ranks."""
    if cfg.threads:
        return cfg.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // cfg.nproc)


def launch_torchrun(cfg: TrainConfig):
    from loraq.distributed.runtime import check_run_settings
    from loraq.training.result import RunResult
    from loraq.training.rundir import prepare_run_dir, resolve_run_dir

    run_dir = resolve_run_dir(cfg).resolve()
    # errors before any process starts; rank 0 empties an --overwrite folder later
    check_run_settings(cfg, cfg.nproc, run_dir, prepare_run_dir(run_dir, cfg))
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
        env = dict(os.environ, **{ERROR_FILE_ENV: str(error_file), LAUNCHED_ENV: "1"})
        if cfg.threads:
            env["OMP_NUM_THREADS"] = str(cfg.threads)
        else:  # torchrun's own default would be 1 thread per rank
            env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(cfg)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
               "-m", "loraq", "train", str(recipe)]
        returncode, held = run_filtered(cmd, env, sys.stderr)
        if returncode != 0:
            message = error_file.read_text().strip() if error_file.exists() else ""
            if message:
                raise LoraqError(message)
            sys.stderr.write(held)
            sys.stderr.flush()
            raise RuntimeError(f"torchrun exited with code {returncode} (the output above says why)")
    summary = json.loads((run_dir / "summary.json").read_text())
    return RunResult(run_dir=run_dir, summary=summary)


# torchrun's (and c10d's) log lines: "W1129 13:05:31.123000 4242 torch/distributed/run.py:...] ..."
_TORCH_LOG_LINE = re.compile(r"^\[?[IWEF]\d{4} \d\d:\d\d:\d\d")
# a traceback, from torchrun or from a rank (torchrun prefixes those with "[rank1]: ")
_TRACEBACK = re.compile(r"^(\[rank\d+\]: *)?Traceback \(most recent call last\)")


class StderrFilter:
    """Pass the ranks' lines through as they come; drop torchrun's; hold back everything after a traceback.

    Lines end at ``\\n`` or ``\\r`` (a live progress bar redraws with ``\\r``).
    ``loraq: error:`` lines are dropped: the launcher prints the one line itself.
    """

    def __init__(self, out: TextIO):
        self.out = out
        self.pending = ""
        self.held: list[str] = []

    def feed(self, text: str) -> None:
        self.pending += text
        while True:
            cut = min((i for i in (self.pending.find("\n"), self.pending.find("\r")) if i >= 0), default=-1)
            if cut < 0:
                return
            line, self.pending = self.pending[:cut + 1], self.pending[cut + 1:]
            self._line(line)

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = ""

    def _line(self, line: str) -> None:
        if self.held or _TRACEBACK.match(line):
            self.held.append(line)
            return
        body = line.strip()
        if _TORCH_LOG_LINE.match(body) or (body and set(body) == {"*"}) or body.startswith("loraq: error: "):
            return
        self.out.write(line)
        self.out.flush()


def run_filtered(cmd: list[str], env: dict[str, str], out: TextIO) -> tuple[int, str]:
    """Run ``cmd`` with its stderr through :class:`StderrFilter`; returns (exit code, held-back text)."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    filt = StderrFilter(out)
    try:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(1 << 16):
            filt.feed(chunk.decode("utf-8", errors="replace"))
        filt.close()
        return proc.wait(), "".join(filt.held)
    except KeyboardInterrupt:  # torchrun got the same SIGINT and stops its ranks; wait for it, then stop too
        proc.wait()
        raise


def record_error_for_launcher(message: str) -> None:
    """Called by a rank's CLI on a LoraqError: the launcher re-raises it as one line.

    Rank 0's message wins; another rank writes only if no message is there yet.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if path and (os.environ.get("RANK", "0") == "0" or not os.path.exists(path)):
        try:
            Path(path).write_text(message + "\n")
        except OSError:
            pass
