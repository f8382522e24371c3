"""A full disk or a read-only output folder: one line naming the folder, exit 2, the last good checkpoint intact,
and a later ``--resume`` (once there is room) ends exactly where an uninterrupted run does.

The suite runs as root, where chmod does not stop writes; so the real cases use a private mount namespace
(``unshare -m``) holding a tiny tmpfs or a read-only bind mount, and are skipped where that is not allowed.
The fault hook covers the same failure everywhere (test_kill_resume.py, test_checkpoints.py).
"""
from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess

import pytest
from reliability_lib import (
    adapter,
    assert_one_line_error,
    loraq_cmd,
    loraq_env,
    max_abs_difference,
    run_loraq,
    snapshot_diff,
    tree_snapshot,
)


@functools.lru_cache(maxsize=1)
def mount_namespaces() -> bool:
    """Whether this machine lets us mount a tmpfs in a private mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = "/tmp/.loraq-mount-probe"
    os.makedirs(probe, exist_ok=True)
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_mounts = pytest.mark.skipif("not mount_namespaces()", reason="cannot mount in a private namespace here")


def in_mount_namespace(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "sh", "-euc", script], capture_output=True, text=True,
                          env=loraq_env(), timeout=timeout)


def assert_error_line(stderr: str, *needles: str) -> None:
    """A run that failed after it started: no traceback, one error line, the last line, holding every needle."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("loraq: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.slow
@needs_mounts
def test_disk_full_on_a_real_small_filesystem(run_flags, reference_run, tmp_path):
    """A tmpfs with room for one checkpoint: the second one fails, the first survives and resumes elsewhere."""
    reference = reference_run.result()
    page = 4096
    pages = lambda n: -(-n // page) * page  # noqa: E731  (tmpfs allocates whole pages)
    one_checkpoint = sum(pages(p.stat().st_size) for p in (reference / "checkpoints" / "step-00000020").iterdir())
    size = one_checkpoint * 3 // 2 + pages((reference / "run.json").stat().st_size) + 8 * page
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    args = run_flags(mnt / "run")
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt}\n"
              f"set +e; {shlex.join(loraq_cmd(*args))} >{tmp_path}/out.txt 2>{tmp_path}/err.txt; "
              f"echo $? >{tmp_path}/rc\n"
              f"set -e; cp -a {mnt}/run {copy}\n")
    done = in_mount_namespace(script)
    assert done.returncode == 0, done.stderr
    stderr = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr[-3000:]
    assert_error_line(stderr, "No space left on device", "step-00000004, is intact")
    assert checkpoint_names(copy) == ["step-00000004"]  # the failed one left no temporary folder

    resumed = run_loraq(run_flags(copy, resume=True))  # on a disk with room
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-00000004" in resumed.stderr
    assert max_abs_difference(adapter(copy), adapter(reference)) == 0.0


@pytest.mark.slow
@needs_mounts
def test_read_only_output_folder_is_one_line_and_untouched(run_flags, reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run.result(), run)
    parent = tmp_path / "ro-parent"
    parent.mkdir()
    before = tree_snapshot(tmp_path)
    cases = {"resume": run_flags(run, resume=True), "overwrite": run_flags(run, overwrite=True),
             "new": run_flags(parent / "new-run")}
    lines = [f"mount --bind {run} {run}", f"mount -o remount,bind,ro {run}",
             f"mount --bind {parent} {parent}", f"mount -o remount,bind,ro {parent}", "set +e"]
    for name, args in cases.items():
        lines.append(f"{shlex.join(loraq_cmd(*args))} >/dev/null 2>{tmp_path}/{name}.err; "
                     f"echo $? >{tmp_path}/{name}.rc")
    done = in_mount_namespace("\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    for name in cases:
        assert (tmp_path / f"{name}.rc").read_text().strip() == "2", name
        assert_one_line_error((tmp_path / f"{name}.err").read_text(), "not writable", "Read-only file system")
        (tmp_path / f"{name}.rc").unlink()
        (tmp_path / f"{name}.err").unlink()
    assert snapshot_diff(before, tree_snapshot(tmp_path)) == []


@pytest.mark.parametrize("fault, words", [("enospc", "No space left on device"), ("erofs", "Read-only file system")])
def test_the_final_adapter_failing_to_write_is_one_line(run_flags, tmp_path, capfd, monkeypatch, fault, words):
    """The last write of a run (the adapter) refused: one error line, no half adapter, the checkpoint kept."""
    from loraq import faults
    from loraq.cli import main

    run = tmp_path / "run"
    monkeypatch.setenv(faults.FAULT_ENV, f"{fault}:final-save:1")
    faults.reset()
    try:
        assert main(run_flags(run, max_steps=6, save_every=4, val_fraction=None, eval_every=None)) == 2
    finally:
        monkeypatch.delenv(faults.FAULT_ENV)
        faults.reset()
    assert_error_line(capfd.readouterr().err, "cannot write the final adapter", str(run), words,
                      "step-00000004, is intact")
    left = sorted(p.name for p in run.iterdir())
    assert left == ["checkpoints", "metrics.jsonl", "run.json"], left  # no adapter, no temporary folder
