"""resolve_source: each kind of --model, and one-line errors for everything a user can get wrong."""
from __future__ import annotations

import json
import shutil

import pytest
from models_testlib import assert_one_line

from loraq.errors import ModelError
from loraq.models.cache import MARKER
from loraq.models.source import resolve_source


def test_none_is_the_default_model_from_the_cache(loraq_cache, tiny_llama_dir):
    folder = loraq_cache / "models" / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / MARKER).write_text("{}")
    src = resolve_source(None)
    assert (src.kind, src.path, src.name) == ("default", folder, "SmolLM2-135M-Instruct")


def test_local_folder_is_dir(tiny_llama_dir):
    src = resolve_source(str(tiny_llama_dir))
    assert src.kind == "dir" and src.path == tiny_llama_dir.resolve() and src.name == tiny_llama_dir.name


def test_bnb_4bit_config_is_bnb4bit(tiny_model_copy):
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tiny_model_copy / "config.json").write_text(json.dumps(cfg))
    assert resolve_source(str(tiny_model_copy)).kind == "bnb4bit"


@pytest.mark.parametrize("qc, needle", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
    ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
])
def test_other_quantized_checkpoints_are_refused(tiny_model_copy, qc, needle):
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    cfg["quantization_config"] = qc
    (tiny_model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as err:
        resolve_source(str(tiny_model_copy))
    assert_one_line(err.value, needle)


def test_gguf_file_converts_once_into_the_cache(loraq_cache, tiny_gguf, monkeypatch):
    src = resolve_source(str(tiny_gguf))
    assert src.kind == "gguf" and src.path.parent == loraq_cache / "gguf" and (src.path / "config.json").is_file()
    assert src.origin == str(tiny_gguf.resolve())

    def no_second_conversion(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr("loraq.models.gguf.convert_gguf_to_folder", no_second_conversion)
    assert resolve_source(str(tiny_gguf)).path == src.path


def test_changed_gguf_file_gets_a_new_cache_entry(loraq_cache, tiny_gguf, tmp_path):
    copy = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf, copy)
    first = resolve_source(str(copy)).path
    with open(copy, "ab") as fh:  # a different size (and mtime) means a different file
        fh.write(b"\0" * 32)
    second = resolve_source(str(copy)).path
    assert first != second and first.is_dir() and second.is_dir()


def test_org_name_that_is_not_a_path_goes_to_the_hub(monkeypatch, tiny_llama_dir):
    calls = []

    def fake_download(repo_id, revision=None, allow_pickle=False):
        calls.append((repo_id, revision, allow_pickle))
        return tiny_llama_dir

    monkeypatch.setattr("loraq.models.hub.download_snapshot", fake_download)
    src = resolve_source("SomeOrg/some-model@v1.0")
    assert (src.kind, src.name, src.path) == ("hub", "SomeOrg/some-model", tiny_llama_dir)
    assert calls == [("SomeOrg/some-model", "v1.0", False)]


@pytest.mark.parametrize("spec, needle", [
    ("./no/such/folder", "no such file or folder"),
    ("/definitely/not/here", "no such file or folder"),
    ("not-a-hub-id", "no such file or folder"),
])
def test_missing_paths(spec, needle):
    with pytest.raises(ModelError) as err:
        resolve_source(spec)
    assert_one_line(err.value, needle, spec)


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError) as err:
        resolve_source(str(tmp_path))
    assert_one_line(err.value, "not a model folder", "config.json")


def test_adapter_folder_passed_as_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError) as err:
        resolve_source(str(tmp_path))
    assert_one_line(err.value, "adapter", "--adapter")


def test_config_that_is_not_json(tiny_model_copy):
    (tiny_model_copy / "config.json").write_text("{ not json")
    with pytest.raises(ModelError) as err:
        resolve_source(str(tiny_model_copy))
    assert_one_line(err.value, "config.json is not valid JSON")


@pytest.mark.parametrize("name, needle", [
    ("notes.txt", "unsupported model file (.txt)"),
    ("model.safetensors", "pass the folder"),
    ("weights.bin", "pass the folder"),
])
def test_unsupported_files(tmp_path, name, needle):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ModelError) as err:
        resolve_source(str(tmp_path / name))
    assert_one_line(err.value, needle)

