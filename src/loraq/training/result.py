"""What a finished training run gives back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """``run_dir``: the run folder (the adapter at its top level); ``summary``: summary.json's contents."""

    run_dir: Path
    summary: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir
