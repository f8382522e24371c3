"""Which layers get adapters, with which rank and scale: PEFT's choices are the reference."""
from __future__ import annotations

import pytest
import torch
from lora_helpers import assert_one_line, peft_lora_layers, peft_model, tiny_model

from loraq.errors import ConfigError
from loraq.lora.config import LoraConfig
from loraq.lora.model import (
    count_parameters,
    inject_lora,
    lora_layers,
    trainable_summary,
)


def _ours(config: LoraConfig, **kw):
    model = tiny_model(**kw)
    inject_lora(model, config)
    return model, {n: layer for n, layer in lora_layers(model)}


@pytest.mark.parametrize("ours_kw, peft_kw", [
    (dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["q_proj", "v_proj"])),
    (dict(target_modules=r".*\.(q|k)_proj"), dict(target_modules=r".*\.(q|k)_proj")),
    (dict(target_modules=[r"re:.*layers\.1\.mlp\..*_proj"]), dict(target_modules=r".*layers\.1\.mlp\..*_proj")),
    (dict(target_modules=["all-linear"]), dict(target_modules="all-linear")),
    (dict(target_modules=["q_proj", "mlp.up_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
     dict(target_modules=["q_proj", "mlp.up_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])),
    (dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
     dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1])),
])
def test_targets_match_peft(ours_kw, peft_kw):
    _, mine = _ours(LoraConfig(r=4, alpha=8, **ours_kw))
    theirs = peft_lora_layers(peft_model(tiny_model(), r=4, lora_alpha=8, **peft_kw))
    assert sorted(mine) == sorted(theirs)


def test_all_linear_leaves_out_the_head_even_untied():
    _, mine = _ours(LoraConfig(), tie=False)
    assert "lm_head" not in mine and len(mine) == 14


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_scaling_per_module_match_peft(rslora):
    patterns = dict(rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6},
                    alpha_pattern={"v_proj": 5, r".*\.1\.mlp\.up_proj": 7})
    _, mine = _ours(LoraConfig(r=4, alpha=8, use_rslora=rslora, **patterns))
    theirs = peft_lora_layers(peft_model(tiny_model(), r=4, lora_alpha=8, use_rslora=rslora,
                                         target_modules="all-linear", **patterns))
    for name, layer in mine.items():
        assert layer.r["default"] == theirs[name].r["default"], name
        assert layer.lora_A["default"].weight.shape == theirs[name].lora_A["default"].weight.shape
        assert layer.scaling["default"] == pytest.approx(theirs[name].scaling["default"], rel=1e-12), name


def test_everything_but_the_adapter_is_frozen_and_counts_match_peft():
    model, _ = _ours(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    pm = peft_model(tiny_model(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert count_parameters(model) == pm.get_nb_trainable_parameters()
    trainable, total = count_parameters(model)
    assert trainable_summary(model) == f"trainable params: {trainable:,} ({100 * trainable / total:.2f}%) of {total:,}"


def test_modules_to_save_are_trainable_copies_and_not_lora_targets():
    model, mine = _ours(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
                        tie=False)
    assert "lm_head" not in mine
    head = model.lm_head
    assert head.modules_to_save["default"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    assert head.modules_to_save["default"].weight.data_ptr() != head.original_module.weight.data_ptr()
    pm = peft_model(tiny_model(tie=False), r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert count_parameters(model) == pm.get_nb_trainable_parameters()


def test_a_target_that_matches_nothing_lists_the_linear_layers():
    with pytest.raises(ConfigError) as err:
        _ours(LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    assert_one_line(str(err.value), "'qkv_proj'", "self_attn.q_proj", "mlp.down_proj", "lm_head")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        _ours(LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ConfigError, match="regular expression"):
        _ours(LoraConfig(target_modules=["re:(unclosed"]))


def test_a_failed_injection_leaves_the_model_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        inject_lora(model, LoraConfig(target_modules=["nope"]))
    assert not lora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field, value, flag", [
    ("r", 0, "rank"), ("r", -3, "rank"), ("alpha", 0, "alpha"), ("alpha", -1.0, "alpha"),
    ("dropout", 1.0, "dropout"), ("dropout", -0.1, "dropout"), ("init", "svd", "init"),
])
def test_bad_settings_are_one_line_config_errors(field, value, flag):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**{field: value}).validate()
    assert_one_line(str(err.value), flag)


def test_from_train_config_carries_every_lora_flag():
    from loraq.config import TrainConfig

    tc = TrainConfig.from_dict({"rank": 8, "alpha": 4, "dropout": 0.1, "target-modules": "q_proj,v_proj",
                                "exclude-modules": "o_proj", "layers-to-transform": "0,1", "rslora": True,
                                "init": "gaussian", "modules-to-save": "lm_head", "rank_pattern": {"v_proj": 2}})
    cfg = LoraConfig.from_train_config(tc)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init) == (8, 4.0, 0.1, True, "gaussian")
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.exclude_modules == ["o_proj"]
    assert cfg.layers_to_transform == [0, 1] and cfg.modules_to_save == ["lm_head"] and cfg.rank_for("x.v_proj") == 2
