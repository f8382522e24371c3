"""Experiment trackers: ``--report-to tensorboard,wandb,mlflow,trackio`` (any subset; none by default).

Each tracker is a :class:`~loraq.training.hooks.Callback` (:class:`~loraq.training.trackers.base.Tracker`)
that reports, through the tracker's own Python package:

* at the start, the run's settings as hyper-parameters;
* every metrics.jsonl line, as it is written, under ``<kind>/<key>`` names
  (:func:`~loraq.training.trackers.base.metric_scalars`: ``train/loss``,
  ``train/lr``, ``train/grad_norm``, ``train/tokens_per_second``, ...,
  ``eval/loss``, ``eval/perplexity``), at the line's step;
* at the end, summary.json's numbers (``summary/final_accuracy`` -- exact
  match --, ``summary/eval_loss``, ...).

Only the process that writes metrics.jsonl (rank 0) reports. Hosted services
stay offline unless the user's own settings say otherwise: wandb in offline
mode (``WANDB_MODE`` wins), MLflow into a file store in the run folder
(``MLFLOW_TRACKING_URI`` wins), trackio into its local database (its own
default; ``TRACKIO_DIR``, ``TRACKIO_SPACE_ID`` win). TensorBoard's event files
go to ``<run>/tensorboard``. A tracker whose package is missing stops the run
before anything loads with one line naming the extra to install; a tracker
that fails during the run is one warning and the run goes on without it.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

from loraq.choices import TRACKERS
from loraq.errors import ConfigError
from loraq.training.trackers.base import Tracker

# tracker -> (the module to import, its package on PyPI, loraq's extra that installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny", "mlflow"),
    "trackio": ("trackio", "trackio", "trackio"),
}


class TrackerMissing(ConfigError):
    """--report-to names a tracker whose package is not installed."""


def require_packages(names: Sequence[str]) -> None:
    """One line naming the extra when a chosen tracker's package is missing (checked before anything loads)."""
    for name in names:
        module, package, extra = PACKAGES[name]
        try:
            missing = importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # a module set to None in sys.modules: as good as missing
            missing = True
        if missing:
            raise TrackerMissing(f"--report-to {name} needs the {package} package: pip install 'loraq[{extra}]' "
                                 f"(or pip install {package})")


def make_trackers(names: Sequence[str], say: Callable[[str], None]) -> list[Tracker]:
    """The trackers ``names`` choose (in :data:`loraq.choices.TRACKERS` order), not yet started."""
    from loraq.training.trackers.mlflow_tracker import MlflowTracker
    from loraq.training.trackers.tensorboard_tracker import TensorBoardTracker
    from loraq.training.trackers.trackio_tracker import TrackioTracker
    from loraq.training.trackers.wandb_tracker import WandbTracker

    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
             "trackio": TrackioTracker}
    require_packages(names)
    return [kinds[name](say) for name in TRACKERS if name in names]


def close_trackers(trackers: Sequence[Tracker]) -> None:
    """Finish whatever a run that stopped early left open (a finished tracker ignores this)."""
    for tracker in trackers:
        tracker.close()
