"""What every benchmark's ``--smoke`` mode shares: a tiny random model, made here, and the flag itself.

A smoke run is one tiny configuration for a few steps, on the code path the real benchmark takes, so that an
API change in loraq that breaks a benchmark fails ``tests/test_bench_smoke.py`` instead of the next person who
runs it. Smokes need no network, no GPU, no llama.cpp and not the default model: :func:`tiny_model` writes a
randomly initialised 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained in-process (vocabulary
~400, ChatML specials and chat template: the tests' own, from ``tests/tiny_models.py``)
into a temporary folder, once per process, removed at exit. Nothing is written into the repository.

    import smoke
    folder = smoke.tiny_model()          # the same folder for every smoke in this process
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HELP = "a few seconds on a tiny random model, no numbers worth keeping: checks the benchmark still runs"
_MADE: dict[str, Path] = {}


def add_flag(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--smoke`` on a benchmark's parser; ``note`` says what the smoke leaves out (e.g. the llama.cpp side)."""
    parser.add_argument("--smoke", action="store_true", help=HELP + (f"; {note}" if note else ""))


def temp_dir(prefix: str) -> Path:
    """A temporary folder removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def tiny_tokenizer():
    """The tests' tiny tokenizer (``tests/tiny_models.py``)."""
    return _tiny_models().make_tiny_tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """The tests' random 2-layer Llama, hidden 64, 4 heads (2 KV), tied embeddings (``tests/tiny_models.py``)."""
    return _tiny_models().make_tiny_llama(vocab_size, seed, **overrides)


def _tiny_models():
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    return importlib.import_module("tiny_models")


def tiny_model() -> Path:
    """A HF folder (safetensors, tokenizer, generation config) of the tiny Llama; made once per process."""
    if "llama" not in _MADE:
        from transformers import GenerationConfig

        folder = temp_dir("loraq-smoke-model-")
        tokenizer = tiny_tokenizer()
        model = tiny_llama(len(tokenizer))
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        _MADE["llama"] = folder
    return _MADE["llama"]


def setup() -> None:
    """The environment of a smoke run: offline, eager kernels, one torch thread, a temporary loraq cache
    (removed at exit).

    Eager: a cold Inductor build alone takes longer than all the smokes together (``LORAQ_COMPILE=1`` in the
    environment keeps the generated kernels on). One thread: on tensors this small, waking a second one costs
    more than it brings, and much more when another job holds the other core (2-3x the smokes' time here)."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LORAQ_NO_HUB", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LORAQ_COMPILE", "0")
    if "cache" not in _MADE:
        _MADE["cache"] = temp_dir("loraq-smoke-cache-")
    os.environ["LORAQ_CACHE"] = str(_MADE["cache"])


def head_jsonl(source: Path, path: Path, n: int) -> Path:
    """The first ``n`` lines of a JSONL file, copied to ``path``."""
    with open(source, encoding="utf-8") as fh:
        path.write_text("".join(line for _, line in zip(range(n), fh)), encoding="utf-8")
    return path


@contextlib.contextmanager
def environment(env: dict | None):
    """``os.environ`` replaced by ``env`` for the block (a child process's environment, in this process)."""
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_command(cmd: list[str], env: dict | None = None, capture_stdout: bool = False) -> tuple[float, int, str]:
    """A benchmark's child command run in this process instead: ``[python, -m, loraq, ...]`` through loraq's CLI,
    ``[python, bench/X.py, ...]`` through that script's ``main(argv)``. Returns what ``throughput.run_timed``
    does (wall seconds, this process's peak RSS, stdout if asked); a failure raises RuntimeError."""
    import io
    import resource

    if cmd[1:3] == ["-m", "loraq"]:
        from loraq.cli import main
        args = cmd[3:]
    elif cmd[1].endswith(".py"):
        script = Path(cmd[1]).resolve()
        if str(script.parent) not in sys.path:
            sys.path.insert(0, str(script.parent))
        main, args = importlib.import_module(script.stem).main, cmd[2:]
    else:
        raise ValueError(f"smoke: cannot run {cmd[:3]} in this process")
    out = io.StringIO()
    start = time.perf_counter()
    with environment(env), contextlib.redirect_stdout(out if capture_stdout else sys.stdout):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None):
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... failed ({code})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return time.perf_counter() - start, peak, out.getvalue()
