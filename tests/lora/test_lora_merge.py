"""Merge/unmerge, disabling, several adapters and combining them, against float64 formulas and PEFT."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from lora_helpers import (
    copy_ours_to_peft,
    logits,
    peft_model,
    randomize_lora,
    rel_err,
    tiny_model,
    token_ids,
)

from loraq.errors import ConfigError
from loraq.lora.config import LoraConfig
from loraq.lora.model import (
    add_weighted_adapter,
    disable_adapters,
    inject_lora,
    lora_layers,
    merge_and_unload,
    set_adapter,
)


def _adapted(seed=0, **cfg):
    model = tiny_model()
    inject_lora(model, LoraConfig(**{"r": 4, "alpha": 8, **cfg}))
    randomize_lora(model, seed=seed)
    return model


def _delta64(layer, name: str) -> torch.Tensor:
    """float64 s * B @ A from the layer's stored factors and its r/alpha."""
    s = layer.lora_alpha[name] / layer.r[name]
    return s * layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weight_is_w_plus_s_b_a_and_gives_the_same_output(rslora):
    ids = token_ids()
    model = _adapted(use_rslora=rslora, rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 3})
    expected = {}
    for name, layer in lora_layers(model):
        s = layer.lora_alpha["default"] / (math.sqrt(layer.r["default"]) if rslora else layer.r["default"])
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        expected[name] = layer.base.weight.double() + s * b @ a
    unmerged = logits(model, ids)
    report = merge_and_unload(model)
    assert sorted(report.merged) == sorted(expected)
    for name, w in expected.items():
        module = model.get_submodule(name)
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32
        assert rel_err(module.weight, w) < 1e-6
    assert rel_err(logits(model, ids), unmerged) < 1e-5
    assert not any(isinstance(p, nn.Parameter) and "lora" in n for n, p in model.named_parameters())


def test_merge_then_unmerge_in_place():
    ids = token_ids()
    model = _adapted()
    before = {n: layer.base.weight.detach().clone() for n, layer in lora_layers(model)}
    out = logits(model, ids)
    for _, layer in lora_layers(model):
        assert layer.merge() == ["default"]
    assert rel_err(logits(model, ids), out) < 1e-5
    for name, layer in lora_layers(model):
        assert rel_err(layer.base.weight, before[name].double() + _delta64(layer, "default")) < 1e-6
        layer.unmerge()
        assert rel_err(layer.base.weight, before[name]) < 1e-6
    assert rel_err(logits(model, ids), out) < 1e-6


def test_merge_to_another_dtype_and_back_is_exact():
    model = _adapted()
    name, layer = lora_layers(model)[0]
    w0 = layer.base.weight.detach().clone()
    layer.merge(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16
    expected = (w0.double() + _delta64(layer, "default")).to(torch.bfloat16)
    assert torch.equal(layer.base.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_disable_adapters_gives_the_base_model_even_when_merged():
    ids = token_ids()
    base = logits(tiny_model(), ids)
    model = _adapted()
    adapted = logits(model, ids)
    assert rel_err(adapted, base) > 1e-3
    with disable_adapters(model):
        assert rel_err(logits(model, ids), base) < 1e-7
    assert rel_err(logits(model, ids), adapted) < 1e-7
    for _, layer in lora_layers(model):
        layer.merge()
    with disable_adapters(model):
        assert rel_err(logits(model, ids), base) < 1e-5
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(model))
    assert rel_err(logits(model, ids), adapted) < 1e-5


def test_two_named_adapters_switch_like_peft():
    ids = token_ids()
    ours = tiny_model()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "first")
    inject_lora(ours, LoraConfig(r=2, alpha=6, target_modules=["v_proj", "down_proj"]), "second")
    randomize_lora(ours)
    pm = peft_model(tiny_model(), adapter_name="first", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    import peft

    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "down_proj"]))
    for name in ("first", "second"):
        pm.set_adapter(name)
        set_adapter(ours, name)
        copy_ours_to_peft(ours, pm, name)
        assert rel_err(logits(ours, ids), logits(pm, ids)) < 1e-5
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in n for n in trainable)
    set_adapter(ours, "first")
    pm.set_adapter("first")
    assert rel_err(logits(ours, ids), logits(pm, ids)) < 1e-5
    with pytest.raises(ConfigError, match="third"):
        set_adapter(ours, "third")


def _two_adapters():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "one")
    inject_lora(model, LoraConfig(r=3, alpha=5, use_rslora=True, target_modules=["v_proj", "o_proj"]), "two")
    randomize_lora(model, std=0.2)
    return model


def _weighted_sum64(layer, weights: dict[str, float]) -> torch.Tensor:
    total = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    for name, w in weights.items():
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
            total += w * layer.scaling[name] * b @ a
    return total


def test_cat_combination_is_the_exact_weighted_sum():
    model = _two_adapters()
    add_weighted_adapter(model, ["one", "two"], [0.7, -1.3], "mix", combination="cat")
    for name, layer in lora_layers(model):
        expected = _weighted_sum64(layer, {"one": 0.7, "two": -1.3})
        got = layer.scaling["mix"] * layer.lora_B["mix"].weight.double() @ layer.lora_A["mix"].weight.double()
        assert rel_err(got, expected) < 1e-6, name
        assert layer.r["mix"] == sum(layer.r[n] for n in ("one", "two") if n in layer.lora_A)


def test_linear_combination_is_the_weighted_sum_of_products_not_of_factors():
    model = _two_adapters()
    add_weighted_adapter(model, ["one", "two"], [0.5, 2.0], "full", combination="linear", rank=7)
    add_weighted_adapter(model, ["one", "two"], [0.5, 2.0], "low", combination="linear", rank=2)
    for name, layer in lora_layers(model):
        expected = _weighted_sum64(layer, {"one": 0.5, "two": 2.0})
        full = layer.scaling["full"] * layer.lora_B["full"].weight.double() @ layer.lora_A["full"].weight.double()
        assert rel_err(full, expected) < 1e-6, name  # rank 7 >= 4 + 3: exact
        u, s, vh = torch.linalg.svd(expected)
        best2 = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young reference
        low = layer.scaling["low"] * layer.lora_B["low"].weight.double() @ layer.lora_A["low"].weight.double()
        assert rel_err(low, best2) < 1e-5, name
    # where both adapters share a layer, summing A's and B's separately would be wrong: make sure we are not that
    layer = dict(lora_layers(model))["model.layers.0.self_attn.v_proj"]
    naive = (0.5 * layer.scaling["one"]) * (layer.lora_B["one"].weight.double()[:, :3]
                                            + layer.lora_B["two"].weight.double()) \
        @ (layer.lora_A["one"].weight.double()[:3] + layer.lora_A["two"].weight.double())
    assert rel_err(naive, _weighted_sum64(layer, {"one": 0.5, "two": 2.0})) > 0.1


def test_combined_adapter_runs_as_the_weighted_sum():
    ids = token_ids()
    model = _two_adapters()
    add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "both", combination="cat")
    set_adapter(model, ["one", "two"])
    both_active = logits(model, ids)
    set_adapter(model, "both")
    assert rel_err(logits(model, ids), both_active) < 1e-5
