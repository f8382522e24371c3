"""Fixtures for the models/ tests: throwaway caches, model folders to break, a tiny GGUF."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture
def loraq_cache(tmp_path, monkeypatch) -> Path:
    """An empty loraq cache for this test only."""
    cache = tmp_path / "loraq-cache"
    monkeypatch.setenv("LORAQ_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_model_copy(tmp_path, tiny_llama_dir) -> Path:
    """A private copy of the tiny Llama folder, free to be broken."""
    out = tmp_path / "tiny-model"
    shutil.copytree(tiny_llama_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_reference(tiny_llama_dir):
    """The tiny Llama as transformers itself loads it (fp32): the reference for logits."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_reference, tiny_tokenizer) -> Path:
    """The tiny Llama written as an F32 GGUF file by the gguf package's writer."""
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tiny_reference, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def probe_ids(tiny_tokenizer) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer("What is the capital of France? The capital of France is Paris.")["input_ids"]])

