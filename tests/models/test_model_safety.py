"""Safe loading: safetensors only unless --allow-pickle; no model code runs unless --trust-remote-code."""
from __future__ import annotations

import json

import pytest
import torch
from models_testlib import assert_one_line, logits
from safetensors.torch import load_file, save_file

from loraq.errors import ConfigError, ModelError
from loraq.models.load import load_model


def _pickle_only(folder):
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def test_pickle_only_folder_is_refused_without_allow_pickle(tiny_model_copy):
    _pickle_only(tiny_model_copy)
    for method in ("lora", "qlora"):
        with pytest.raises(ModelError) as err:
            load_model(str(tiny_model_copy), method=method, device="cpu")
        assert_one_line(err.value, "pytorch_model.bin", "--allow-pickle")


def test_pickle_only_folder_loads_with_allow_pickle(tiny_model_copy, tiny_reference, probe_ids):
    _pickle_only(tiny_model_copy)
    loaded = load_model(str(tiny_model_copy), method="lora", dtype="fp32", allow_pickle=True, device="cpu")
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))


def test_safetensors_win_over_pickles(tiny_model_copy, tiny_reference, probe_ids):
    # a pickle next to safetensors is never opened: make it a bomb that would fail loudly
    (tiny_model_copy / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    loaded = load_model(str(tiny_model_copy), method="lora", dtype="fp32", device="cpu")
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))


def _custom_code_folder(folder, sentinel):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "loraq_test_custom"
    cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")


def test_remote_code_is_refused_and_never_runs(tiny_model_copy, tmp_path):
    sentinel = tmp_path / "code-ran"
    _custom_code_folder(tiny_model_copy, sentinel)
    for method in ("lora", "qlora"):
        with pytest.raises(ModelError) as err:
            load_model(str(tiny_model_copy), method=method, device="cpu")
        assert_one_line(err.value, "auto_map", "--trust-remote-code")
    assert not sentinel.exists()


def test_known_architecture_with_auto_map_uses_the_builtin_class(tiny_model_copy, tmp_path, tiny_reference, probe_ids):
    sentinel = tmp_path / "code-ran"
    _custom_code_folder(tiny_model_copy, sentinel)
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tiny_model_copy / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(tiny_model_copy), method="lora", dtype="fp32", device="cpu")
    assert torch.equal(logits(loaded.model, probe_ids), logits(tiny_reference, probe_ids))
    assert not sentinel.exists()


def test_unknown_architecture(tiny_model_copy):
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (tiny_model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_model_copy), method="lora", device="cpu")
    assert_one_line(err.value, "'no_such_arch' is not supported by transformers")


def test_missing_shard(tiny_model_copy):
    state = load_file(str(tiny_model_copy / "model.safetensors"))
    (tiny_model_copy / "model.safetensors").unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:5]}, str(tiny_model_copy / "model-00001-of-00002.safetensors"))
    index = {"metadata": {},
             "weight_map": {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (tiny_model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_model_copy), method="lora", device="cpu")
    assert_one_line(err.value, "model-00002-of-00002.safetensors", "missing")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_incomplete_weights(tiny_model_copy, method):
    state = load_file(str(tiny_model_copy / "model.safetensors"))
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(tiny_model_copy / "model.safetensors"))
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_model_copy), method=method, device="cpu")
    assert_one_line(err.value, "model.layers.1.mlp.down_proj.weight")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_corrupt_safetensors(tiny_model_copy, method):
    (tiny_model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_model_copy), method=method, device="cpu")
    assert_one_line(err.value, "cannot load")


def test_no_weights_at_all(tiny_model_copy):
    (tiny_model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_model_copy), method="lora", device="cpu")
    assert_one_line(err.value, "no weight files")


def test_no_tokenizer(tiny_model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_model_copy / name).unlink()
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_model_copy), method="lora", device="cpu")
    assert_one_line(err.value, "no tokenizer files")


@pytest.mark.parametrize("kw, needle", [
    ({"method": "lorax"}, "--method"), ({"quant": "int4"}, "--quant"), ({"blocksize": 48}, "--blocksize"),
])
def test_bad_options(tiny_llama_dir, kw, needle):
    with pytest.raises(ConfigError) as err:
        load_model(str(tiny_llama_dir), **kw)
    assert_one_line(err.value, needle)
