"""Building a C kernel module once per flag set into a temporary cache, for the tests that hold each build (the
native one, and ones with an instruction set switched off) to its reference."""
from __future__ import annotations

import pytest


def build_each(tmp_path_factory, module, builds: dict) -> dict:
    """``{name: library}`` for every ``name: (flags, runs_here)`` in ``builds`` this CPU runs, built by
    ``module.build(flags)`` into a temporary loraq cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAQ_CACHE", str(tmp_path_factory.mktemp(f"{module.__name__.rpartition('.')[2]}-cache")))
        return {name: module.build(flags) for name, (flags, runs) in builds.items() if runs}
