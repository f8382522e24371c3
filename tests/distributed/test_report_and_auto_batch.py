"""Under --nproc: only rank 0 reports to a tracker, and --batch-size auto is chosen once, before the ranks start."""
from __future__ import annotations

import json

import numpy as np
import pytest
from dist_helpers import base_args, loraq_cli, torchrun, train_lines

pytestmark = pytest.mark.slow


def test_two_ranks_report_once_and_share_the_auto_batch(tiny_llama_dir, chat_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, out, nproc=2, batch_size="auto"),
                      "--report-to", "tensorboard"])
    chosen = json.loads((out / "run.json").read_text())["config"]["batch_size"]
    assert isinstance(chosen, int) and chosen >= 1
    assert proc.stderr.count(f"--batch-size auto: {chosen}") == 1
    # one writer: every step once, with metrics.jsonl's values (float32, as TensorBoard stores them)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert got == [(r["step"], float(np.float32(r["loss"]))) for r in train_lines(out)]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the scalars and the hparams


def test_auto_batch_under_a_hand_started_torchrun_is_refused(tiny_llama_dir, chat_data, tmp_path):
    """Each rank would measure its own free memory; the ranks must agree on the batch."""
    with pytest.raises(AssertionError, match="--batch-size auto is resolved before the ranks start"):
        torchrun(["-m", "loraq", "train", *base_args(tiny_llama_dir, chat_data, tmp_path / "run", batch_size="auto")])
