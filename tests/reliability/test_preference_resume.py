"""A DPO run killed mid-step and resumed ends bit for bit where an uninterrupted one does (CPU, fp32, one thread).

What DPO adds to an SFT run's state is the reference cache: computed once
before the first step, written to the run folder, and read back on
``--resume`` (not recomputed). The killed run is resumed from its step-4
checkpoint after dying inside step 7; its adapter, every logged loss and
reward, and the summary's preference accuracies must equal the uninterrupted
run's.
"""
from __future__ import annotations

import json
import random

from reliability_lib import adapter, killed_by_sigkill, loraq_env, max_abs_difference, run_loraq, start_loraq


def write_pairs(path, n=24, seed=0):
    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "fox", "one", "two", "sun", "moon"]
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.sample(words, 2)
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Join {a} and {b}."}],
                                 "chosen": [{"role": "assistant", "content": f"{a}-{b}"}],
                                 "rejected": [{"role": "assistant", "content": f"{b} {a}"}]}) + "\n")
    return path


def test_dpo_killed_and_resumed_equals_uninterrupted(run_flags, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")

    def flags(out, **kw):
        return run_flags(out, data=data, objective="dpo", beta=0.2, max_steps=10, save_every=4, eval_every=5,
                         val_fraction=0.25, dropout=0.1, **kw)

    reference = start_loraq(flags(tmp_path / "reference"))
    run = tmp_path / "killed"
    crashed = run_loraq(flags(run), env=loraq_env(LORAQ_CRASH_AT="after-backward:7"))
    assert killed_by_sigkill(crashed), crashed.stderr[-3000:]
    assert (run / "reference_logps.safetensors").is_file()
    done = run_loraq(flags(run, resume=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step-00000004" in done.stderr and "read back" in done.stderr
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    ref_dir = tmp_path / "reference"
    assert max_abs_difference(adapter(run), adapter(ref_dir)) == 0.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_accuracy", "eval_loss",
                "eval_preference_accuracy"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in ref_rows], key
    assert any(r.get("rewards_chosen") for r in rows)  # the rewards were logged and moved
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, ref_dir))
    for key in ("train_loss", "eval_loss", "base_preference_accuracy", "final_preference_accuracy",
                "eval_reward_margin"):
        assert summary[key] == ref_summary[key], key
    assert 0.0 <= summary["final_preference_accuracy"] <= 1.0 and summary["objective"] == "dpo"
