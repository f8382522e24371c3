"""Weights & Biases through the wandb package, offline unless ``WANDB_MODE`` says otherwise.

The run lives in ``<run>/wandb/offline-run-*`` (``wandb sync`` uploads it
later; ``wandb leet <run>/wandb`` browses it locally); project ``loraq``
(``WANDB_PROJECT`` wins), named after the run folder; the settings are its
config, summary.json's numbers its summary.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loraq.training.trackers.base import Tracker, flat_settings, summary_scalars


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, settings: dict[str, Any]) -> None:
        import wandb

        run_dir = Path(settings["run_dir"])
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE") or "offline", dir=str(run_dir),
                              project=os.environ.get("WANDB_PROJECT") or "loraq", name=run_dir.name,
                              config=flat_settings(settings), settings=wandb.Settings(silent=True))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, summary: dict[str, Any] | None, step: int) -> None:
        if summary is not None:
            self.run.summary.update(summary_scalars(summary))
        self.run.finish(exit_code=0 if summary is not None else 1)
