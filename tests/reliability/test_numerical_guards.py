"""Numerical guards: a NaN/inf loss or gradient stops the run naming the step and the last good checkpoint
(exit 2, one error line), or with ``--nonfinite skip`` skips the step and counts it; fp16 on CUDA scales the loss.

The NaN comes from the fault hook (``LORAQ_FAULT=nan-loss:N``), which multiplies step N's loss by NaN before
the backward pass -- what an overflow does, at a step of our choosing.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from loraq import faults
from loraq.cli import main


@pytest.fixture
def fault(monkeypatch):
    """``fault("nan-loss:3")`` arms the hook for this test only."""
    def arm(spec: str) -> None:
        monkeypatch.setenv(faults.FAULT_ENV, spec)
        faults.reset()

    yield arm
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    faults.reset()


def train_args(run_flags, out, **overrides):
    values = dict(max_steps=8, save_every=4, val_fraction=None, eval_every=None)
    values.update(overrides)
    return run_flags(out, **values)[:]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("loraq: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return errors


@pytest.mark.parametrize("spec, what", [("nan-loss:6", "the loss is nan"), ("inf-grad:6", "the gradient is inf"),
                                        ("nan-grad:6", "the gradient is nan")])
def test_a_nonfinite_step_stops_the_run_naming_the_step_and_the_checkpoint(run_flags, tmp_path, capfd, fault, spec,
                                                                            what):
    out = tmp_path / "run"
    fault(spec)
    assert main(train_args(run_flags, out)) == 2
    [line] = error_lines(capfd.readouterr().err)
    assert "step 6" in line and what in line, line
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-00000004'}" in line
    assert "--nonfinite skip" in line and "--lr" in line
    # nothing of the bad step was logged or saved; the checkpoint it names resumes
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    assert not (out / "adapter_model.safetensors").exists()


def test_after_a_resume_the_stop_names_the_checkpoint_it_resumed_from(run_flags, tmp_path, capfd, fault):
    out = tmp_path / "run"
    fault("nan-loss:6")
    assert main(train_args(run_flags, out)) == 2
    capfd.readouterr()
    assert main(train_args(run_flags, out, resume=True)) == 2  # the same step blows up again
    [line] = error_lines(capfd.readouterr().err)
    assert "step 6" in line and "step-00000004" in line, line


def test_nonfinite_skip_skips_the_step_and_counts_it(run_flags, tmp_path, capfd, fault):
    out = tmp_path / "run"
    fault("nan-loss:3")
    assert main(train_args(run_flags, out, nonfinite="skip")) == 0
    capfd.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8 and math.isfinite(summary["train_loss"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())
    # the count survives a resume: the step-4 checkpoint carries it
    for name in ("adapter_model.safetensors", "summary.json"):
        (out / name).unlink()
    assert main(train_args(run_flags, out, nonfinite="skip", resume=True)) == 0
    assert "resumed from step-00000004" in capfd.readouterr().err
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1


def test_a_skipped_step_leaves_the_weights_as_they_were(run_flags, tmp_path, capfd, fault):
    """Skipping step 4 (the last) keeps step 3's weights: equal to a run that stops after 3 steps."""
    fault("nan-loss:4")
    assert main(train_args(run_flags, tmp_path / "skip", max_steps=4, save_every=0, nonfinite="skip",
                           schedule="constant", warmup=0)) == 0
    fault("nan-loss:99")
    assert main(train_args(run_flags, tmp_path / "three", max_steps=3, save_every=0, schedule="constant",
                           warmup=0)) == 0
    capfd.readouterr()
    skipped = load_file(str(tmp_path / "skip" / "adapter_model.safetensors"))
    three = load_file(str(tmp_path / "three" / "adapter_model.safetensors"))
    for key in three:
        assert torch.equal(skipped[key], three[key]), key
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["train_loss"])


@pytest.mark.gpu
def test_fp16_on_cuda_scales_the_loss_and_an_overflow_skips_through_the_scaler(run_flags, tmp_path, capfd, fault):
    """On CUDA, fp16 uses a GradScaler: an inf gradient halves the scale and the run goes on (exit 0)."""
    out = tmp_path / "run"
    fault("inf-grad:2")
    assert main(train_args(run_flags, out, dtype="fp16", max_steps=5, save_every=4)) == 0
    capfd.readouterr()
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["scaler"] is not None and state["scaler"]["scale"] < 65536.0  # the default start, halved at step 2
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())
