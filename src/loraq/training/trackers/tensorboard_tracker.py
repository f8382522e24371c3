"""TensorBoard: event files in ``<run>/tensorboard`` through ``torch.utils.tensorboard`` (the tensorboard package).

Scalars are stored as TensorBoard stores them, in float32; the settings go in
as hyper-parameters (the HParams dashboard) with summary.json's numbers as
their metrics, and as one text entry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraq.training.trackers.base import Tracker, flat_settings, summary_scalars

SUBFOLDER = "tensorboard"


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, settings: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.settings = flat_settings(settings)
        self.writer = SummaryWriter(log_dir=str(Path(settings["run_dir"]) / SUBFOLDER))
        self.writer.add_text("settings", "    " + json.dumps(settings, indent=1, default=str).replace("\n", "\n    "))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def finish(self, summary: dict[str, Any] | None, step: int) -> None:
        if summary is not None:
            self.writer.add_hparams(self.settings, summary_scalars(summary), run_name=".", global_step=step)
        self.writer.close()
