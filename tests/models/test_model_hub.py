"""Hub ids, without a network: a fake huggingface_hub, and a real one reading a hand-built HF cache offline."""
from __future__ import annotations

import shutil

import pytest
import torch
from models_testlib import assert_one_line, logits

from loraq.errors import ModelError
from loraq.models.load import load_model
from loraq.models.source import resolve_source


def test_download_asks_only_for_safe_files(monkeypatch, tiny_llama_dir):
    seen = {}

    def fake_snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tiny_llama_dir)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    src = resolve_source("org/tiny")
    assert src.kind == "hub" and src.path == tiny_llama_dir
    assert seen["repo_id"] == "org/tiny" and seen["local_files_only"] is False
    patterns = seen["allow_patterns"]
    assert "*.safetensors" in patterns and "*.json" in patterns and not any(".bin" in p for p in patterns)
    resolve_source("org/tiny", allow_pickle=True)
    assert "*.bin" in seen["allow_patterns"]


@pytest.mark.parametrize("error", [ConnectionError("refused"), OSError("name resolution"), TimeoutError()])
def test_unreachable_hub_is_one_line(monkeypatch, error):
    def unreachable(repo_id, **kw):
        raise error

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    with pytest.raises(ModelError) as err:
        resolve_source("org/model")
    assert_one_line(err.value, "org/model", "unreachable", "local model folder", "HF_HUB_OFFLINE")


def test_missing_repository(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, **kw):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as raised on a 404; needs no response object
        Exception.__init__(error, "404 Client Error\nRepository Not Found")
        raise error

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", not_found)
    with pytest.raises(ModelError) as err:
        resolve_source("org/nothing")
    assert_one_line(err.value, "no such model on the hub")


def _hand_built_hf_cache(root, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout huggingface_hub documents: refs/main -> snapshots/<commit>/<files>."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_offline_with_a_cached_copy_loads_it(tmp_path, monkeypatch, tiny_llama_dir, tiny_reference, probe_ids):
    snapshot = _hand_built_hf_cache(tmp_path / "hf", "org/tiny", tiny_llama_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("org/tiny", method="lora", dtype="fp32", device="cpu")
    assert loaded.source.kind == "hub" and loaded.source.path == snapshot
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))


def test_offline_without_a_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        resolve_source("org/not-cached")
    assert_one_line(err.value, "offline", "no cached copy", "local model folder")
