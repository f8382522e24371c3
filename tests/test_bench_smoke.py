"""Every benchmark in bench/ still runs: each entry point's ``--smoke`` mode, here, in this process.

Benchmarks are run by hand and rarely, so an API change in loraq that broke one went unnoticed until the next
person ran it (bench/export_demo.py broke twice that way). Each script of bench/ with a ``__main__`` block (found
by globbing, so a new one without ``--smoke`` fails the first test) has a ``--smoke`` mode: one tiny
configuration on a tiny random model (bench/smoke.py), a step or two, the benchmark's own code path; no network,
GPU, llama.cpp or default model. They run in this process through each script's ``main(argv)``, one test each,
so torch, transformers, PEFT and TRL are imported once, with the eager kernels (a cold Inductor build costs more
than all the smokes together). Two things no benchmark calls are left out of the training runs, being most of a
tiny run's cost: the memory preflight (tests/planning holds it; ``loraq.plan``, which benchmarks call, still
runs) and the loss.png chart.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.MULTILINE)
ENTRY_POINTS = sorted(p for p in BENCH.glob("*.py") if MAIN_GUARD.search(p.read_text(encoding="utf-8")))


def test_every_benchmark_entry_point_has_a_smoke_mode():
    assert len(ENTRY_POINTS) >= 10, f"bench/ entry points not found under {BENCH}"
    missing = [p.name for p in ENTRY_POINTS if "--smoke" not in p.read_text(encoding="utf-8")]
    assert not missing, f"bench scripts without a --smoke mode (see bench/smoke.py): {missing}"


def _no_default_model(*_args, **_kwargs):
    raise AssertionError("a --smoke run asked for the default model; smokes use bench/smoke.py's tiny one")


def _skip(monkeypatch, module: str, name: str, replacement) -> None:
    """``module.name`` replaced for the test where it exists (a rename there only makes this test slower)."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return
    if hasattr(found, name):
        monkeypatch.setattr(found, name, replacement)


@pytest.fixture
def isolated(monkeypatch):
    """The process as it was before the smoke (environment, sys.path, threads, working directory); the default
    model refused; the preflight and the chart skipped."""
    monkeypatch.setattr("loraq.models.default.ensure_default_model", _no_default_model)
    _skip(monkeypatch, "loraq.planning.preflight", "preflight", lambda cfg, _say: cfg)
    _skip(monkeypatch, "loraq.training.finish", "plot_loss", lambda *_args, **_kwargs: None)
    environ, path, threads, cwd = dict(os.environ), list(sys.path), torch.get_num_threads(), os.getcwd()
    os.environ.update(LORAQ_COMPILE="0", HF_HUB_OFFLINE="1")
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        torch.set_num_threads(threads)
        os.chdir(cwd)


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_benchmark_smoke_runs(script, isolated):
    module = importlib.import_module(script.stem)
    assert module.main(["--smoke"]) in (None, 0)
