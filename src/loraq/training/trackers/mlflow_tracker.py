"""MLflow through its client (mlflow-skinny), into a file store in ``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI``
names another.

MLflow 3 keeps the file store in maintenance and asks for
``MLFLOW_ALLOW_FILE_STORE=true`` to use it; loraq sets that (unless set)
only when it chose the file store itself. Experiment ``loraq``
(``MLFLOW_EXPERIMENT_NAME`` wins), a run named after the run folder; the
settings are its parameters, every scalar a metric at its step, summary.json's
numbers metrics at the last step. ``mlflow ui --backend-store-uri <run>/mlruns``
shows it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from loraq.training.trackers.base import Tracker, flat_settings, summary_scalars

BATCH = 100  # MLflow's limit of parameters per log_batch call
MAX_PARAM_CHARS = 6000


class MlflowTracker(Tracker):
    name = "mlflow"

    def start(self, settings: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(settings["run_dir"])
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "loraq"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flat_settings(settings).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + BATCH])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def finish(self, summary: dict[str, Any] | None, step: int) -> None:
        if summary is not None:
            self.log(summary_scalars(summary), step)
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "FAILED")
