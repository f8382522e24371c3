"""Resume under 2 ranks, and user mistakes that surface inside a rank: one line, exit 2."""
from __future__ import annotations

import io

import pytest
from dist_helpers import base_args, loraq_cli, torchrun, train_lines, weights

from loraq.config import TrainConfig
from loraq.distributed.runtime import check_run_settings
from loraq.errors import ConfigError
from loraq.training.launch import StderrFilter


@pytest.mark.slow
def test_resume_under_two_ranks_equals_uninterrupted(tiny_llama_dir, chat_data, tmp_path):
    """Killed at the start of step 4 (checkpoint at step 2), resumed: the uninterrupted run's adapter, bit for bit.

    With dropout each rank draws its own masks, so this also needs every rank's random state back. The
    uninterrupted run is started by hand with torchrun, the others with --nproc 2: both ways write the same.
    """
    flags = dict(max_steps=5, save_every=2, dropout=0.1)
    whole, part = tmp_path / "whole", tmp_path / "part"
    by_hand = torchrun(["-m", "loraq", "train", *base_args(tiny_llama_dir, chat_data, whole, **flags)])
    assert by_hand.stdout.count("done: 5 steps") == 1  # rank 0 alone reports
    assert [r["step"] for r in train_lines(whole)] == [1, 2, 3, 4, 5]  # and alone writes

    crashed = loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, part, nproc=2, **flags)],
                        env={"LORAQ_CRASH_AT": "step-start:4"}, check=False)
    assert crashed.returncode != 0
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (part / "adapter_model.safetensors").exists()
    resumed = loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, part, nproc=2, resume=True, **flags)])
    assert "resumed from step-00000002" in resumed.stderr
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    assert [r["step"] for r in train_lines(part)] == [1, 2, 3, 4, 5]


def test_data_mistake_found_by_the_ranks_is_one_line(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   "not json\n")
    proc = loraq_cli(["train", *base_args(tiny_llama_dir, bad, tmp_path / "run", nproc=2)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # exactly one line
    assert proc.stderr.startswith("loraq: error: ") and "bad.jsonl:2" in proc.stderr


@pytest.mark.slow
def test_failure_in_rank_0_alone_mid_run_is_one_line(tiny_llama_dir, chat_data, tmp_path):
    """A full disk at rank 0's first checkpoint: rank 1 loses its peer and tracebacks; the user sees one line."""
    proc = loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, tmp_path / "run", nproc=2, save_every=1)],
                     env={"LORAQ_FAULT": "enospc:checkpoint-write:1"}, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("loraq: error: cannot write checkpoint step-00000001")
    # before it only what one process would print: status lines and the first step's progress
    assert all(line.startswith(("loraq: ", "step 1/3")) for line in lines[:-1]), lines
    assert "Traceback" not in proc.stderr and "rank1" not in proc.stderr


def test_resume_with_another_number_of_processes_is_refused(tiny_llama_dir, chat_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"config": {}, "world_size": 2}')
    proc = loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, run, resume=True, nproc=3)], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "resume with --nproc 2" in proc.stderr


@pytest.mark.parametrize("values, world, words", [
    ({"fsdp": True}, 1, "--fsdp shards the model across processes"),
    ({"fsdp": True, "method": "full"}, 2, "--method full"),
])
def test_settings_that_need_several_processes(values, world, words):
    cfg = TrainConfig.from_dict(values)
    with pytest.raises(ConfigError, match=words):
        check_run_settings(cfg, world)


def test_stderr_filter_passes_the_ranks_lines_and_holds_back_tracebacks():
    out = io.StringIO()
    f = StderrFilter(out)
    f.feed("loraq: lora on tiny\nW1129 13:05:31.123000 4242 torch/distributed/run.py:792] \n")
    f.feed("*****************************************\nstep 1/3  loss 6.0\rstep 2/3 lo")
    f.feed("ss 5.9\nloraq: error: data.jsonl:2: malformed\n[rank1]: Traceback (most recent call last):\n")
    f.feed("Traceback (most recent call last):\n  File \"x.py\"\nChildFailedError:\n")
    f.close()
    assert out.getvalue() == "loraq: lora on tiny\nstep 1/3  loss 6.0\rstep 2/3 loss 5.9\n"
    assert "".join(f.held).startswith("[rank1]: Traceback") and "ChildFailedError" in "".join(f.held)
