"""Linear4bit against nn.Linear holding bitsandbytes' dequantized weight, and against bitsandbytes' own layer."""
from __future__ import annotations

import pytest
import torch
from quant_helpers import bits
from torch import nn

from loraq.quant.linear import Linear4bit


def _pair(in_features=96, out_features=40, bias=True, compute_dtype=torch.float32, quant_type="nf4", seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, Linear4bit.from_linear(linear, quant_type=quant_type, compute_dtype=compute_dtype)


def _bnb_weight(bnbf, linear, quant_type="nf4", dtype=torch.float32):
    """The weight as bitsandbytes quantizes and dequantizes it (float64 math where its CPU kernel is off)."""
    packed, state = bnbf.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type=quant_type,
                                       compress_statistics=True)
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.view(-1).long()
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)
    w = (state.code.double()[nibbles] * absmax.double().repeat_interleave(64)).float()
    return w.view(state.shape).to(dtype)


@pytest.mark.parametrize("leading", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_output_and_input_gradient_match_float64_linear(bnbf, leading, quant_type):
    linear, layer = _pair(quant_type=quant_type)
    w64 = _bnb_weight(bnbf, linear, quant_type).double()
    x = torch.randn(*leading, 96, requires_grad=True)
    grad_out = torch.randn(*leading, 40)
    y = layer(x)
    y.backward(grad_out)
    x64 = x.detach().double()
    assert y.shape == (*leading, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x64 @ w64.T + linear.bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad_out.double() @ w64, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_same_as_nn_linear_with_the_dequantized_weight(bnbf, compute_dtype):
    linear, layer = _pair(compute_dtype=compute_dtype, seed=1)
    reference = nn.Linear(96, 40).to(compute_dtype)
    with torch.no_grad():
        reference.weight.copy_(_bnb_weight(bnbf, linear, dtype=compute_dtype))
        reference.bias.copy_(linear.bias)
    x = torch.randn(4, 7, 96, dtype=compute_dtype)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    grad_out = torch.randn(4, 7, 40, dtype=compute_dtype)
    layer(x).backward(grad_out)
    reference(x_ref).backward(grad_out)
    assert torch.equal(bits(layer(x).detach()), bits(reference(x_ref).detach()))
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


def test_bias_gradient_when_the_bias_is_trained():
    linear, layer = _pair(seed=2)
    layer.bias.requires_grad_(True)
    x, grad_out = torch.randn(3, 5, 96), torch.randn(3, 5, 40)
    layer(x).backward(grad_out)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(dim=(0, 1)))


def test_backward_keeps_no_dequantized_weight():
    _, layer = _pair(in_features=256, out_features=128, compute_dtype=torch.bfloat16)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(8, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    # everything the graph keeps for backward: the packed uint8 weight itself, nothing else
    assert len(saved) == 1
    assert saved[0].dtype == torch.uint8 and saved[0].data_ptr() == layer.weight.data_ptr()
    assert sum(t.numel() * t.element_size() for t in saved) == 256 * 128 // 2
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_state_dict_is_bitsandbytes_own():
    bnb = pytest.importorskip("bitsandbytes")
    # 128 columns: whole blocks per row, where bitsandbytes' own CPU dequantization is right
    linear, layer = _pair(in_features=128, seed=3)
    theirs = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32,
                               quant_type="nf4", compress_statistics=True)
    theirs.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=True)
    theirs.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move
    mine_sd, their_sd = layer.state_dict(), theirs.state_dict()
    assert list(mine_sd) == list(their_sd) == [
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4"]
    for key in their_sd:
        assert mine_sd[key].dtype == their_sd[key].dtype and torch.equal(mine_sd[key], their_sd[key]), key
    # and bitsandbytes' state dict loads into a layer that held other weights
    _, other = _pair(in_features=64, out_features=8, bias=True, seed=4)
    other.load_state_dict(their_sd)
    assert (other.in_features, other.out_features) == (128, 40)
    theirs.support_avx512bf16_for_cpu = False  # its fused AVX-512 kernel computes in bf16; compare the plain path
    x = torch.randn(6, 128)
    assert torch.equal(other(x), theirs(x))


def test_to_moves_packed_weight_and_state_but_never_casts_them():
    _, layer = _pair(seed=5)
    layer.to(torch.float16)
    assert layer.weight.dtype == torch.uint8 and layer.quant_state.absmax.dtype == torch.uint8
    assert layer.quant_state.nested_absmax.dtype == torch.float32 and layer.bias.dtype == torch.float16
    layer.to("meta")
    assert layer.weight.device.type == "meta"
    assert all(t.device.type == "meta" for t in layer.quant_state.tensors().values())


def test_from_linear_rejects_non_finite_weights_naming_the_layer():
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.0.q_proj"):
        Linear4bit.from_linear(linear, name="layers.0.q_proj")


def test_float32_input_with_bf16_compute_returns_float32(bnbf):
    linear, layer = _pair(compute_dtype=torch.bfloat16, seed=6)
    reference = nn.Linear(96, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        reference.weight.copy_(_bnb_weight(bnbf, linear, dtype=torch.bfloat16))
        reference.bias.copy_(linear.bias)
    x = torch.randn(3, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = reference(x_ref.to(torch.bfloat16)).float()  # what bitsandbytes' Linear4bit does too
    grad_out = torch.randn(3, 40)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x_ref.grad)
