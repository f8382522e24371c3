"""DDP on 2 CPU processes (gloo) against one process that accumulates the same micro-batches.

One process with --grad-accum 2 and two with --nproc 2 see the same rows in
each step (the global batch is batch-size x grad-accum x processes) and
normalise by the same global token count; only the way gradients are summed
differs (autograd accumulation vs DDP's all-reduce). Same seed, fp32, no
dropout: the adapters must agree to float rounding.
"""
from __future__ import annotations

import json

import pytest
from dist_helpers import (
    assert_same_weights,
    base_args,
    loraq_cli,
    max_relative_difference,
    train_in_process,
    train_lines,
    weights,
)


def test_issue_check_nproc_2_equals_grad_accum_2(tiny_llama_dir, chat_data, tmp_path):
    """The issue's check: `loraq train --nproc 2 --batch-size 2` == `loraq train --batch-size 2 --grad-accum 2`."""
    one_process_run, out = tmp_path / "one", tmp_path / "two"
    train_in_process(tiny_llama_dir, chat_data, one_process_run, grad_accum=2)
    proc = loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, out, nproc=2)])
    reference, got = weights(one_process_run), weights(out)
    relative = max_relative_difference(reference, got)
    print(f"max relative difference, --nproc 2 vs --grad-accum 2: {relative:.3g}")
    assert relative < 1e-5  # the issue asks 1e-4
    assert_same_weights(reference, got, rtol=1e-5)
    # the comparison is not empty: training moved B away from its zero start
    assert any(k.endswith("lora_B.weight") and float(v.abs().max()) > 1e-4 for k, v in got.items())

    # global figures: per step, the same loss (global mean) and tokens (summed over ranks), written once
    ref_lines, lines = train_lines(one_process_run), train_lines(out)
    assert [r["step"] for r in lines] == [1, 2, 3]
    for a, b in zip(ref_lines, lines):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == json.loads(
        (one_process_run / "summary.json").read_text())["tokens"]
    assert len(summary["peak_memory_bytes_per_rank"]) == 2
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    # what the terminal shows: one report (the launcher's), the ranks' progress once, no torchrun chatter
    assert proc.stdout.count("done: 3 steps") == 1
    assert proc.stderr.count("step 3/3") == 1
    assert "2 processes (DDP, gloo); global batch 4 = batch-size 2 x grad-accum 1 x 2" in proc.stderr
    assert "Traceback" not in proc.stderr and "torch.distributed" not in proc.stderr


@pytest.mark.slow
def test_full_fine_tuning_two_ranks_equals_one_process(tiny_llama_dir, chat_data, tmp_path):
    """--method full under DDP: every weight trained, the saved model equals the one-process run's."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_in_process(tiny_llama_dir, chat_data, one, method="full", grad_accum=2, lr=1e-3, dropout=None)
    loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, two, method="full", nproc=2, lr=1e-3, dropout=None)])
    reference, got = weights(one, "model.safetensors"), weights(two, "model.safetensors")
    base = weights(tiny_llama_dir, "model.safetensors")
    moved = [k for k in reference if k in base and not (reference[k] == base[k]).all()]
    assert len(moved) > len(reference) // 2  # most weights changed
    assert_same_weights(reference, got, rtol=1e-5)
