"""trackio, into its local database (its own default place; ``TRACKIO_DIR`` moves it, ``TRACKIO_SPACE_ID`` sends
it to a Space): project ``loraq`` (``TRACKIO_PROJECT`` wins), a run named after the run folder, the settings
as its config; ``trackio show --project loraq`` opens the dashboard.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from loraq.training.trackers.base import Tracker, flat_settings, summary_scalars


class TrackioTracker(Tracker):
    name = "trackio"

    def start(self, settings: dict[str, Any]) -> None:
        import trackio

        project = os.environ.get("TRACKIO_PROJECT") or "loraq"
        name = Path(settings["run_dir"]).name
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would interleave with loraq's report
            self.run = trackio.init(project=project, name=name, config=flat_settings(settings), embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)
        self.say(f"loraq: trackio: project {project}, run {name} (trackio show --project {project})")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, summary: dict[str, Any] | None, step: int) -> None:
        if summary is not None:
            self.run.log(summary_scalars(summary), step=step)
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            trackio.finish()  # the current run, ours: clears it too, so trackio's exit hook does not finish it again
