"""The one-node LoRA path (lora/fused.py) against float64 autograd and against the generic path."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from loraq.lora.layer import LoraLinear
from loraq.quant.functional import dequantize_4bit
from loraq.quant.linear import Linear4bit


def _layer(four_bit: bool, bias: bool, dtype=torch.float32, in_f=128, out_f=96, r=4, alpha=12.0):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias)
    if four_bit:
        base = Linear4bit.from_linear(base, compute_dtype=dtype)
    else:
        base = base.to(dtype)
    layer = LoraLinear(base)
    layer.add_adapter("default", r, alpha)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, 0.3)
        layer.lora_B["default"].weight.normal_(0, 0.3)
    if bias:
        layer.base.bias.requires_grad_(True)  # a trained bias gets its gradient too
    return layer


def _grads(layer: LoraLinear, x: torch.Tensor, g: torch.Tensor, fused: bool):
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    if fused:
        y = layer(x)
        assert layer._fused_forward(x) is not None, "this case should take the fused path"
    else:
        y = layer.base(x)
        y = layer._add_update(y, x, "default")
    y.backward(g)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bias = layer.base.bias
    return y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_forward_and_grads_match_float64(four_bit, bias):
    layer = _layer(four_bit, bias)
    x = torch.randn(3, 7, 128)
    g = torch.randn(3, 7, 96)
    y, dx, da, db, dbias = _grads(layer, x, g, fused=True)

    w = (dequantize_4bit(layer.base.weight, layer.base.quant_state, torch.float64) if four_bit
         else layer.base.weight.detach().double())
    x64 = x.double().requires_grad_()
    a64 = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b64 = layer.lora_B["default"].weight.detach().double().requires_grad_()
    bias64 = layer.base.bias.detach().double().requires_grad_() if bias else None
    ref = x64 @ w.T + 3.0 * (x64 @ a64.T) @ b64.T  # s = 12 / 4
    if bias:
        ref = ref + bias64
    ref.backward(g.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for ours, theirs in ((dx, x64.grad), (da, a64.grad), (db, b64.grad)) + (((dbias, bias64.grad),) if bias else ()):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("four_bit", [False, True])
def test_fused_equals_generic_path_in_bf16(four_bit):
    layer = _layer(four_bit, bias=False, dtype=torch.bfloat16)
    x = torch.randn(4, 16, 128).bfloat16()
    g = torch.randn(4, 16, 96).bfloat16()
    fused = _grads(layer, x, g, fused=True)
    generic = _grads(layer, x, g, fused=False)
    for ours, theirs in zip(fused[:4], generic[:4]):
        assert ours.dtype == theirs.dtype
        # the same products; only where the scale is applied (before or after a bf16 rounding) differs
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def test_generic_path_where_fusion_does_not_apply():
    layer = _layer(False, bias=False)
    layer.add_adapter("second", 2, 4.0)
    layer.active_adapters = ["default", "second"]
    assert layer._fused_forward(torch.randn(2, 128)) is None
    layer.active_adapters = ["default"]
    layer.lora_dropout["default"] = nn.Dropout(0.1)
    assert layer._fused_forward(torch.randn(2, 128)) is None


def test_a_stack_of_4bit_layers_sharing_the_dequantization_buffer_matches_float64():
    """Every 4-bit layer dequantizes into one reused buffer (quant/scratch.py): two layers of different sizes,
    forward then backward (each re-dequantizes after the other overwrote the buffer), against float64."""
    first, second = _layer(True, bias=False, in_f=128, out_f=96), _layer(True, bias=False, in_f=96, out_f=160)
    x = torch.randn(2, 5, 128)
    g = torch.randn(2, 5, 160)
    xg = x.clone().requires_grad_()
    second(first(xg)).backward(g)

    def ref_layer(layer, inp):
        w = dequantize_4bit(layer.base.weight, layer.base.quant_state, torch.float64)
        a = layer.lora_A["default"].weight.detach().double().requires_grad_()
        b = layer.lora_B["default"].weight.detach().double().requires_grad_()
        return inp @ w.T + 3.0 * (inp @ a.T) @ b.T, a, b

    x64 = x.double().requires_grad_()
    h, a1, b1 = ref_layer(first, x64)
    y, a2, b2 = ref_layer(second, h)
    y.backward(g.double())
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=5e-4)
    for layer, a, b in ((first, a1, b1), (second, a2, b2)):
        torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), a.grad, rtol=1e-4, atol=5e-4)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), b.grad, rtol=1e-4, atol=5e-4)


def test_the_buffer_is_reused_and_kept_apart_from_inference_mode():
    from loraq.quant.functional import dequantize_for_product

    layer = _layer(True, bias=False)
    packed, state = layer.base.weight, layer.base.quant_state
    with torch.inference_mode():  # generation before training makes an inference tensor of its own
        inference = dequantize_for_product(packed, state, torch.float32)
    one = dequantize_for_product(packed, state, torch.float32)
    two = dequantize_for_product(packed, state, torch.float32)
    assert one.data_ptr() == two.data_ptr() != inference.data_ptr()
    assert torch.equal(two, dequantize_4bit(packed, state, torch.float32))
    layer(torch.randn(3, 128, requires_grad=True)).sum().backward()  # writes into it outside inference mode
