"""Kill-and-resume: a run SIGKILLed at many moments and resumed each time ends exactly where an uninterrupted one does.

One run folder is killed eight times -- before it has written anything, in the
middle of a step (gradients computed, weights not yet updated; weights
updated, schedule not yet), in the middle of a checkpoint write (a temporary
folder with half the files), right after a checkpoint (renamed, older ones not
yet pruned; and pruned), at a moment chosen by the clock alone, and while the
final adapter is being written -- and once stopped by a full disk; it is
resumed with ``--resume`` after each. Its adapter must equal, bit for bit, that
of an uninterrupted run with the same seed (CPU, fp32, one thread), and its
metrics.jsonl must hold each step once with the uninterrupted run's values.
"""
from __future__ import annotations

import json
import time

import pytest
from reliability_lib import (
    adapter,
    kill_when_step_logged,
    killed_by_sigkill,
    loraq_env,
    max_abs_difference,
    run_loraq,
    snapshot_diff,
    start_loraq,
    train_steps_logged,
    tree_snapshot,
)


def checkpoints(run):
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def crash(flags, point: str):
    """Run ``flags`` with the fault hook set to SIGKILL the process at ``point``; check it died there."""
    proc = run_loraq(flags, env=loraq_env(LORAQ_CRASH_AT=point))
    assert killed_by_sigkill(proc), f"not killed at {point} (code {proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def test_killed_eight_times_and_a_full_disk_then_resume_equals_uninterrupted(run_flags, reference_run, tmp_path):
    run = tmp_path / "killed"
    resume = run_flags(run, auto_resume=True)  # a restart loop: resume when there is a checkpoint, else start

    # 1. killed while starting up, before it wrote anything: no folder is left, and --auto-resume starts the run
    proc = start_loraq(run_flags(run))
    time.sleep(1.0)
    proc.kill()
    proc.communicate()
    assert not (run / "run.json").exists()

    # 2. mid-step 3: gradients computed, weights not updated; no checkpoint yet, so the resume starts over
    crash(resume, "after-backward:3")
    assert (run / "run.json").is_file() and train_steps_logged(run) == [1, 2] and checkpoints(run) == []

    # 3. during the second checkpoint write (step 8): a temporary folder holding half the files
    crash(resume, "checkpoint-write:2")
    names = checkpoints(run)
    assert "step-00000004" in names and "step-00000008" not in names, names
    temp = [n for n in names if n.startswith(".step-00000008.tmp-")]
    assert len(temp) == 1, names
    half = sorted(p.name for p in (run / "checkpoints" / temp[0]).iterdir())
    assert half == ["optimizer.safetensors", "trainable.safetensors"], half  # no rng, no state.json

    # 4. right after a checkpoint (step 12) is renamed into place, before older ones are pruned
    crash(resume, "checkpoint-renamed:2")  # resumed from 4: writes 8, then 12
    assert checkpoints(run) == ["step-00000004", "step-00000008", "step-00000012"]  # the leftover temp was removed

    # 5. wherever the clock says: killed as soon as step 14 is logged
    proc = start_loraq(resume)
    kill_when_step_logged(proc, run, 14)
    assert killed_by_sigkill(proc)
    assert checkpoints(run)[-1] == "step-00000012"

    # 6. mid-step 3 after the resume (step 15): weights updated, schedule and metrics not yet
    crash(resume, "after-optimizer-step:3")
    assert max(train_steps_logged(run)) == 14

    # 7. the disk is full when step 16's checkpoint is written: one error line, step 12's checkpoint untouched
    before = tree_snapshot(run / "checkpoints")
    full = run_loraq(resume, env=loraq_env(LORAQ_FAULT="enospc:checkpoint-write:1"))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("loraq: error:")] == lines[-1:]
    for words in (str(run), "checkpoint step-00000016", "No space left on device", "step-00000012, is intact",
                  "--resume"):
        assert words in lines[-1], (words, lines[-1])
    assert snapshot_diff(before, tree_snapshot(run / "checkpoints")) == []  # no temporary folder either

    # 8. right after step 16's checkpoint is written and the oldest pruned
    crash(resume, "checkpoint-saved:1")
    assert checkpoints(run) == ["step-00000012", "step-00000016"]

    # 9. every step done, killed while the final adapter is being written: nothing of it in the run folder
    crash(resume, "final-save:1")
    assert not (run / "adapter_model.safetensors").exists()
    assert checkpoints(run) == ["step-00000016", "step-00000020"]

    # the last resume finishes from step 20
    done = run_loraq(resume)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step-00000020" in done.stderr
    reference_dir = reference_run.result()

    assert max_abs_difference(adapter(run), adapter(reference_dir)) == 0.0
    assert train_steps_logged(run) == list(range(1, 25))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [6, 12, 18, 24]
    # every logged loss, learning rate and eval loss is the uninterrupted run's
    for key in ("loss", "lr", "grad_norm", "eval_loss", "tokens"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in ref_rows], key
    summary = json.loads((run / "summary.json").read_text())
    ref_summary = json.loads((reference_dir / "summary.json").read_text())
    for key in ("steps", "tokens", "train_loss", "eval_loss", "skipped_steps", "trainable_parameters"):
        assert summary[key] == ref_summary[key], key
    assert summary["steps"] == 24 and summary["skipped_steps"] == 0 and summary["tokens_per_second"] > 0
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or p.name.startswith((".final-", ".loraq-"))]


@pytest.mark.slow
def test_bf16_resume_is_bitwise_too_on_cpu(run_flags, tmp_path):
    """bf16 on the CPU is deterministic too: killed mid-checkpoint, the adapter is bit for bit the same."""
    def flags(out, **kw):
        return run_flags(out, dtype="bf16", max_steps=12, **kw)

    run = tmp_path / "killed"
    reference = start_loraq(flags(tmp_path / "reference"))
    crash(flags(run), "checkpoint-write:2")  # writing step 8's checkpoint
    done = run_loraq(flags(run, resume=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step-00000004" in done.stderr
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]
    ours, theirs = adapter(run), adapter(tmp_path / "reference")
    assert json.loads((run / "run.json").read_text())["dtype"] == "bf16"
    assert max_abs_difference(ours, theirs) == 0.0
