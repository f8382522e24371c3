"""Adapter folders: PEFT loads ours, we load PEFT's, and loading is strict."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from lora_helpers import (
    assert_one_line,
    logits,
    peft_model,
    randomize_lora,
    rel_err,
    tiny_model,
    token_ids,
)
from safetensors.torch import load_file, save_file

from loraq.errors import AdapterError
from loraq.lora.config import LoraConfig
from loraq.lora.files import load_adapter, read_adapter_config, save_adapter
from loraq.lora.model import inject_lora, lora_layers


def _peft_load(folder, tie=True):
    import peft

    return peft.PeftModel.from_pretrained(tiny_model(tie=tie), str(folder)).eval()


CONFIGS = {
    "suffixes": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "all-linear+patterns+rslora": dict(rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                       alpha_pattern={"v_proj": 3}, use_rslora=True),
    "regex+layers": dict(target_modules=[r"re:.*\.(k|o)_proj", "up_proj"], layers_to_transform=[1]),
    "exclude": dict(target_modules=["all-linear"], exclude_modules=["model.layers.0.mlp.gate_proj", "o_proj"]),
}


@pytest.mark.parametrize("which", list(CONFIGS))
def test_peft_loads_our_adapter_and_gives_our_logits(tmp_path, which):
    ids = token_ids()
    ours = tiny_model()
    inject_lora(ours, LoraConfig(r=4, alpha=8, **CONFIGS[which]))
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == "tiny"
    assert sorted((tmp_path / "a").iterdir()) == [tmp_path / "a" / "adapter_config.json",
                                                  tmp_path / "a" / "adapter_model.safetensors"]
    pm = _peft_load(tmp_path / "a")
    from lora_helpers import peft_lora_layers

    assert sorted(peft_lora_layers(pm)) == sorted(n for n, _ in lora_layers(ours))
    assert rel_err(logits(pm, ids), logits(ours, ids)) < 1e-5


def test_our_keys_shapes_and_config_fields_are_peft_s(tmp_path):
    ours = tiny_model()
    inject_lora(ours, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "up_proj"], use_rslora=True))
    save_adapter(ours, tmp_path / "ours")
    pm = peft_model(tiny_model(), r=4, lora_alpha=8, lora_dropout=0.1,
                    target_modules=["q_proj", "up_proj"], use_rslora=True)
    pm.save_pretrained(str(tmp_path / "peft"))
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern",
                "alpha_pattern", "bias", "lora_dropout", "init_lora_weights", "layers_to_transform", "modules_to_save"):
        assert ours_cfg[key] == peft_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_we_load_peft_s_adapter_and_give_peft_s_logits(tmp_path):
    ids = token_ids()
    pm = peft_model(tiny_model(), r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                    rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 5})
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = tiny_model()
    config = load_adapter(ours, tmp_path / "peft")
    assert config.r == 4 and config.use_rslora
    assert rel_err(logits(ours, ids), logits(pm, ids)) < 1e-5


def test_modules_to_save_round_trip_with_peft(tmp_path):
    ids = token_ids()
    ours = tiny_model(tie=False)
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    randomize_lora(ours)
    with torch.no_grad():
        ours.lm_head.modules_to_save["default"].weight.mul_(1.5)
    save_adapter(ours, tmp_path / "a")
    pm = _peft_load(tmp_path / "a", tie=False)
    assert rel_err(logits(pm, ids), logits(ours, ids)) < 1e-5
    back = tiny_model(tie=False)
    load_adapter(back, tmp_path / "a")
    assert rel_err(logits(back, ids), logits(ours, ids)) < 1e-6
    from loraq.lora.model import disable_adapters

    with disable_adapters(back):  # the original head comes back
        assert rel_err(logits(back, ids), logits(tiny_model(tie=False), ids)) < 1e-7


def test_pissa_adapter_is_saved_relative_to_the_original_base(tmp_path):
    ids = token_ids()
    ours = tiny_model()
    inject_lora(ours, LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # "training": move A and B away from their PiSSA start
        for _, layer in lora_layers(ours):
            layer.lora_A["default"].weight.mul_(1.1)
            layer.lora_B["default"].weight.add_(0.01)
    save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    pm = _peft_load(tmp_path / "a")  # on the ORIGINAL weights
    assert rel_err(logits(pm, ids), logits(ours, ids)) < 1e-5


# -- strictness -------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    """A valid adapter folder (random A and B) and the model it came from."""
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    return save_adapter(model, tmp_path / "adapter")


def _edit_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))


def _load_fails(folder, *needles, model=None, **kw):
    model = model or tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError) as err:
        load_adapter(model, folder, **kw)
    assert_one_line(str(err.value), *needles)
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_tensor_is_named(saved):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    _edit_tensors(saved, lambda t: t.pop(key))
    _load_fails(saved, key, "model.layers.1.self_attn.v_proj")


def test_unexpected_tensor_is_named(saved):
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _edit_tensors(saved, lambda t: t.__setitem__(key, torch.zeros(4, 64)))
    _load_fails(saved, key)


def test_rank_mismatch_between_config_and_weights(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    _load_fails(saved, "r=8", "rank 4")


def test_a_base_model_that_does_not_fit_is_reported_as_such(saved):
    _load_fails(saved, "another base model", "model.layers.0.self_attn.q_proj", model=tiny_model(hidden=32))
    one_layer = tiny_model(layers=1)
    _load_fails(saved, "unexpected tensor", "model.layers.1", model=one_layer)


def test_bad_folders_are_one_line_errors(saved, tmp_path):
    _load_fails(tmp_path / "nowhere", "does not exist")
    (saved / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    _load_fails(saved, "adapter_model.safetensors", "damaged")
    (saved / "adapter_config.json").unlink()
    _load_fails(saved, "adapter_config.json")


def test_pickle_only_adapter_is_refused_unless_allowed(tmp_path):
    ids = token_ids()
    pm = peft_model(tiny_model(), r=4, lora_alpha=8, target_modules=["q_proj"])
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    _load_fails(tmp_path / "bin", "adapter_model.bin", "pickle", "--allow-pickle")
    ours = tiny_model()
    load_adapter(ours, tmp_path / "bin", allow_pickle=True)
    assert rel_err(logits(ours, ids), logits(pm, ids)) < 1e-5


def test_unsupported_peft_features_are_refused(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(AdapterError, match="lora_bias"):
        read_adapter_config(saved)


def test_a_dora_config_without_its_magnitudes_is_refused(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="lora_magnitude_vector"):
        load_adapter(model, saved)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_never_replaces_a_folder_that_is_not_an_adapter(tmp_path, saved):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    model = tiny_model()
    load_adapter(model, saved)
    with pytest.raises(AdapterError, match="not an adapter folder"):
        save_adapter(model, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    save_adapter(model, saved)  # an adapter folder is replaced
    shutil.rmtree(saved)
