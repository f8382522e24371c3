"""Fixtures for the reliability suite: a tiny model, a dataset, and the flags of a short resumable run."""
from __future__ import annotations

import pytest
from reliability_lib import write_chat_jsonl


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """40 chat examples: 36 train rows after --val-fraction 0.1, 9 batches of 4 per epoch."""
    return write_chat_jsonl(tmp_path_factory.mktemp("reliability-data") / "chat.jsonl", n=40)


@pytest.fixture(scope="session")
def run_flags(tiny_llama_dir, chat_data):
    """``run_flags(out, **overrides)``: the CLI flags of a short LoRA run that checkpoints often.

    fp32 on one thread (bitwise reproducible), dropout > 0 (the RNG state
    matters on resume), 24 steps over 2.7 epochs (a resume crosses an epoch
    boundary), a validation split evaluated every 6 steps.
    """
    def flags(out, **overrides):
        values = {"model": tiny_llama_dir, "data": chat_data, "method": "lora", "dtype": "fp32", "max-steps": 24,
                  "save-every": 4, "keep-checkpoints": 2, "dropout": 0.1, "threads": 1, "seq-len": 64,
                  "batch-size": 4, "eval-samples": 0, "lr": 1e-2, "seed": 3, "val-fraction": 0.1, "eval-every": 6,
                  "rank": 4, "output-dir": out}
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        args = ["train"]
        for key, value in values.items():
            if value is True:
                args.append(f"--{key}")
            elif value is not None and value is not False:
                args += [f"--{key}", str(value)]
        return args

    return flags


class _BackgroundRun:
    """A `loraq train` subprocess started on first request and awaited when its result is needed."""

    def __init__(self, args, run_dir):
        from reliability_lib import start_loraq

        self.run_dir = run_dir
        self.proc = start_loraq(args)
        self._done = False

    def result(self, timeout: float = 300):
        if not self._done:
            _, err = self.proc.communicate(timeout=timeout)
            assert self.proc.returncode == 0, err[-3000:]
            self._done = True
        return self.run_dir


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, run_flags):
    """The uninterrupted run every resumed run is compared with (started in the background: one thread)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return _BackgroundRun(run_flags(run_dir), run_dir)


@pytest.fixture(scope="session", autouse=True)
def _start_reference_early(request):
    """Start the reference run at the beginning of the session when some test will need it, so that it trains
    (one thread) while the in-process tests use the other core, instead of being waited for later."""
    if any("reference_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("reference_run")
