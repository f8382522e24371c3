"""--report-to: each tracker's own reader gets back exactly what metrics.jsonl says.

One tiny run reports to all four trackers at once (a separate process, so that
trackio's local store can be pointed at a temporary folder); then TensorBoard's
event-file reader, wandb's reader of its offline transaction log (``wandb leet
inspect --json``), MLflow's client on the file store and trackio's SQLite
storage read the values back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import loraq
from loraq.cli import main
from loraq.training.trackers.base import Tracker

pytestmark = pytest.mark.slow


def chat_jsonl(path, n=30):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                              {"role": "assistant", "content": str(2 * i)}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def reported_run(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    env = dict(os.environ, TRACKIO_DIR=str(tmp / "trackio"), HF_HUB_OFFLINE="1")
    env.pop("WANDB_MODE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir = tmp / "run"
    cmd = [sys.executable, "-m", "loraq", "train", "--model", str(tiny_llama_dir),
           "--data", str(chat_jsonl(tmp / "chat.jsonl")), "--val-fraction", "0.2", "--method", "lora",
           "--max-steps", "4", "--eval-every", "2", "--batch-size", "2", "--seq-len", "64", "--dtype", "fp32",
           "--eval-samples", "2", "--threads", "1", "--output-dir", str(run_dir),
           "--report-to", "tensorboard,wandb,mlflow,trackio"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir, records, summary, env


def expected(records, kind, key):
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


def test_tensorboard_event_files_hold_the_metrics(reported_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, records, _, _ = reported_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag, kind, key in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                           ("train/grad_norm", "train", "grad_norm"), ("eval/loss", "eval", "eval_loss")):
        got = {e.step: e.value for e in events.Scalars(tag)}
        # TensorBoard stores scalars as float32: equal to metrics.jsonl's value rounded to float32
        assert got == {s: float(np.float32(v)) for s, v in expected(records, kind, key).items()}, tag
    assert len(got) == 2 and len(events.Scalars("train/loss")) == 4


def test_wandb_offline_run_holds_the_metrics(reported_run):
    run_dir, records, summary, env = reported_run
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(run_dir / "wandb")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    history = {}
    for line in lines:
        if line.get("type") == "history":
            history.setdefault(line["history"]["step"]["num"], {}).update(line["history"]["item"])
    for kind, key, name in (("train", "loss", "train/loss"), ("train", "tokens_per_second", "train/tokens_per_second"),
                            ("eval", "eval_loss", "eval/loss")):
        assert {s: h[name] for s, h in history.items() if name in h} == expected(records, kind, key), name
    state = json.loads(subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json", str(run_dir / "wandb")],
                                      env=env, capture_output=True, text=True, timeout=120).stdout)
    assert json.dumps(summary["final_accuracy"]) in json.dumps(state)  # the summary's exact match is there


def test_mlflow_file_store_holds_the_metrics(reported_run):
    from mlflow.tracking import MlflowClient

    run_dir, records, summary, _ = reported_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("loraq").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["rank"] == "16"
    for name, kind, key in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                            ("eval/perplexity", "eval", "perplexity")):
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert got == expected(records, kind, key), name
    assert run.data.metrics["summary/final_accuracy"] == summary["final_accuracy"]


def test_trackio_local_store_holds_the_metrics(reported_run):
    run_dir, records, summary, env = reported_run
    code = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            f"print(json.dumps(S.get_logs('loraq', {run_dir.name!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    logs = json.loads(out.stdout)
    got = {row["step"]: row["train/loss"] for row in logs if "train/loss" in row}
    assert got == expected(records, "train", "loss")
    evals = {row["step"]: row["eval/loss"] for row in logs if "eval/loss" in row}
    assert evals == expected(records, "eval", "eval_loss")
    assert any(row.get("summary/final_accuracy") == summary["final_accuracy"] for row in logs)


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    code = ("import sys; sys.modules['wandb'] = None; from loraq.cli import main; "
            f"sys.exit(main(['train', '--model', {str(tiny_llama_dir)!r}, '--report-to', 'wandb', "
            f"'--output-dir', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "loraq[wandb]" in lines[0] and "--report-to wandb" in lines[0]
    assert not out.exists()


def test_an_unknown_tracker_is_one_line(tmp_path, capsys):
    assert main(["train", "--report-to", "tensorbord", "--output-dir", str(tmp_path / "r")]) == 2
    assert "tensorboard" in capsys.readouterr().err


def test_a_tracker_failing_mid_run_is_a_warning_and_the_run_finishes(tiny_llama_dir, tmp_path):
    warnings, logged = [], []

    class Flaky(Tracker):
        name = "flaky"

        def start(self, settings):
            pass

        def log(self, scalars, step):
            if step == 2:
                raise ConnectionError("the service went away")
            logged.append(step)

        def finish(self, summary, step):
            logged.append("finished")

    result = loraq.train(model=str(tiny_llama_dir), data=str(chat_jsonl(tmp_path / "c.jsonl")), method="lora",
                         max_steps=3, batch_size=2, seq_len=64, dtype="fp32", eval_samples=0, threads=1,
                         output_dir=str(tmp_path / "run"), callbacks=[Flaky(warnings.append)])
    assert result.summary["steps"] == 3 and (result.run_dir / "adapter_model.safetensors").is_file()
    assert logged == [1]  # silent after its failure: not called again, not finished
    assert len(warnings) == 1 and "flaky" in warnings[0] and "ConnectionError" in warnings[0]
