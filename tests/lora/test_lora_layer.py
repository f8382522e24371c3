"""The LoRA layer against PEFT and against float64 formulas."""
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

from loraq.lora.config import LoraConfig
from loraq.lora.layer import LoraLinear
from loraq.lora.model import inject_lora, lora_layers


def _layer(in_f=24, out_f=16, r=4, alpha=8.0, rslora=False, dropout=0.0, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    layer = LoraLinear(base)
    layer.add_adapter("default", r, alpha, rslora, dropout)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
    return layer


def _reference(layer: LoraLinear, x: torch.Tensor, r: int, alpha: float, rslora: bool) -> torch.Tensor:
    """float64: W x + b + s B A x."""
    s = alpha / math.sqrt(r) if rslora else alpha / r
    w = layer.base.weight.double()
    a = layer.lora_A["default"].weight.double()
    b = layer.lora_B["default"].weight.double()
    y = x.double() @ w.T + s * (x.double() @ a.T) @ b.T
    return y + layer.base.bias.double() if layer.base.bias is not None else y


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_float64_formula(rslora):
    layer = _layer(r=4, alpha=8.0, rslora=rslora)
    x = torch.randn(3, 5, 24)
    assert rel_err(layer(x), _reference(layer, x, 4, 8.0, rslora)) < 1e-6


@pytest.mark.parametrize("rslora", [False, True])
def test_model_forward_equals_peft_with_same_a_b(rslora):
    ids = token_ids()
    ours = tiny_model()
    inject_lora(ours, LoraConfig(r=4, alpha=12, use_rslora=rslora, target_modules=["q_proj", "v_proj", "up_proj"],
                                 rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3}))
    randomize_lora(ours)
    pm = peft_model(tiny_model(), r=4, lora_alpha=12, use_rslora=rslora, target_modules=["q_proj", "v_proj", "up_proj"],
                    rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3})
    copy_ours_to_peft(ours, pm)
    ref = logits(pm, ids)
    assert rel_err(logits(ours, ids), ref) < 1e-5
    assert rel_err(ref, logits(tiny_model(), ids)) > 1e-3  # the adapters do change the output


def test_no_dropout_op_when_p_is_zero_and_dropout_when_positive():
    layer = _layer(dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in layer.modules())
    layer.train()
    x = torch.randn(4, 24)
    assert rel_err(layer(x), _reference(layer, x, 4, 8.0, False)) < 1e-6  # train mode, nothing dropped

    dropped = _layer(dropout=0.5)
    dropped.train()
    torch.manual_seed(0)
    assert rel_err(dropped(x), _reference(dropped, x, 4, 8.0, False)) > 1e-3
    dropped.eval()
    assert rel_err(dropped(x), _reference(dropped, x, 4, 8.0, False)) < 1e-6


def test_bf16_input_fp32_masters_and_gradients():
    layer = _layer(dtype=torch.bfloat16)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, _reference(layer, x, 4, 8.0, False)) < 2e-2
    y.float().square().sum().backward()
    grad_a = layer.lora_A["default"].weight.grad
    assert grad_a is not None and grad_a.dtype == torch.float32
    # float64 autograd reference for dL/dA
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().double()
    ref = x.double() @ layer.base.weight.double().T + layer.base.bias.double() + 2.0 * (x.double() @ a.T) @ b.T
    ref.square().sum().backward()
    assert rel_err(grad_a, a.grad) < 5e-2
    assert layer.base.weight.grad is None


def test_default_init_is_kaiming_uniform_a_and_zero_b_so_output_is_unchanged():
    ids = token_ids()
    model = tiny_model()
    inject_lora(model, LoraConfig(r=8, alpha=16))
    for _, layer in lora_layers(model):
        a = layer.lora_A["default"].weight
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.equal(logits(model, ids), logits(tiny_model(), ids))


def test_gaussian_init_std_is_one_over_r():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=8, alpha=16, init="gaussian"))
    a = torch.cat([layer.lora_A["default"].weight.flatten() for _, layer in lora_layers(model)])
    assert abs(a.std().item() - 1 / 8) < 0.01
    assert all(torch.count_nonzero(layer.lora_B["default"].weight) == 0 for _, layer in lora_layers(model))


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_moves_the_principal_part_and_keeps_the_output(rslora):
    ids = token_ids()
    original = tiny_model()
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, alpha=8, use_rslora=rslora, init="pissa",
                                  target_modules=["q_proj", "down_proj"]))
    for name, layer in lora_layers(model):
        w = original.get_submodule(name).weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]  # Eckart-Young: the best rank-4 part
        delta = layer.delta_weight("default").double()
        assert rel_err(delta, best) < 1e-5
        assert rel_err(layer.base.weight.double(), w - best) < 1e-5
    assert rel_err(logits(model, ids), logits(original, ids)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_inference_product_equals_the_float64_formula_and_follows_updates(dtype):
    """Without autograd the update adds into the base's output with cached (s B)^T; it equals the formula, and an
    in-place change of B (an optimizer step between two evaluations) is seen at once."""
    layer = _layer(r=4, alpha=8.0, dtype=dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        assert rel_err(layer(x), _reference(layer, x, 4, 8.0, False)) < tolerance
        layer.lora_B["default"].weight.mul_(-3.0)
        assert rel_err(layer(x), _reference(layer, x, 4, 8.0, False)) < tolerance
        layer.delete_adapter("default")
        assert not layer._inference_factors
