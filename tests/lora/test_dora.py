"""DoRA (``--dora``, PEFT's ``use_dora``): the norm, the layer, files both ways and merging.

References: float64 formulas, PEFT's DoRA layers (forward, gradients, ``merge_and_unload``), on a 16-bit
base and on transformers + bitsandbytes' 4-bit base.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lora_helpers import VOCAB, logits, peft_model, rel_err, tiny_model, token_ids

from loraq.lora import dora
from loraq.lora.config import LoraConfig
from loraq.lora.files import load_adapter, save_adapter
from loraq.lora.layer import LoraLinear
from loraq.lora.model import inject_lora, lora_layers, merge_and_unload
from loraq.quant.functional import dequantize_4bit
from loraq.quant.linear import Linear4bit


def _dora_layer(base: nn.Module, r=4, alpha=8.0, dropout=0.0):
    layer = LoraLinear(base)
    layer.add_adapter("default", r, alpha, dropout=dropout, use_dora=True)
    layer.active_adapters = ["default"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g) * 0.2)
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.2)
        layer.init_magnitude("default")
        layer.lora_magnitude_vector["default"].mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
    return layer


@pytest.mark.parametrize("kind", ["dense", "4bit", "conv1d"])
def test_weight_norm_in_row_chunks_equals_the_float64_definition(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = nn.Linear(80, 72)
    base = {"dense": linear, "4bit": Linear4bit.from_linear(linear, compute_dtype=torch.float32),
            "conv1d": Conv1D(72, 80)}[kind]
    weight = {"dense": linear.weight, "conv1d": base.weight.t()}.get(kind)
    if kind == "4bit":
        weight = dequantize_4bit(base.weight, base.quant_state, torch.float64)
    a, b = torch.randn(4, 80), torch.randn(72, 4)
    expected = dora.reference_weight_norm(weight.detach(), a, b, 0.5)
    for chunk in (80 * 8, 1 << 20):  # several chunks (for 4-bit: aligned to the 64-element blocks), and one
        assert rel_err(dora.weight_norm(base, a, b, 0.5, chunk_elements=chunk), expected) < 1e-6


def test_a_4bit_weight_is_decoded_a_chunk_of_rows_at_a_time():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(256, 512), compute_dtype=torch.float32)
    decoded_rows = []
    original = base.dequantize_rows

    def counting(start, stop, dtype=None, absmax=None):
        out = original(start, stop, dtype, absmax)
        decoded_rows.append(out.shape[0])
        return out

    base.dequantize_rows = counting  # this instance only
    dora.weight_norm(base, torch.randn(4, 256), torch.randn(512, 4), 1.0, chunk_elements=256 * 32)
    assert sum(decoded_rows) == 512 and max(decoded_rows) == 32  # never the whole 512 x 256 weight at once


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_layer_forward_and_gradients_match_float64(dropout):
    torch.manual_seed(0)
    layer = _dora_layer(nn.Linear(48, 40), dropout=dropout).train()
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 40)
    xr = x.clone().requires_grad_()
    torch.manual_seed(7)
    y = layer(xr)
    y.backward(g)

    torch.manual_seed(7)  # the same dropout mask
    xd = layer.lora_dropout["default"](x) if dropout else x
    w, bias = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    m = layer.lora_magnitude_vector["default"].detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    xd64 = x64 * (xd != 0) / (1 - dropout) if dropout else x64
    s = 2.0
    n = torch.linalg.vector_norm(w + s * b.detach() @ a.detach(), dim=1)  # a constant for backward
    c = m / n
    ref = x64 @ w.T + bias + (c - 1) * (xd64 @ w.T) + c * s * (xd64 @ a.T @ b.T)
    ref.backward(g.double())
    assert rel_err(y, ref) < 1e-6
    for ours, theirs in ((xr.grad, x64.grad), (layer.lora_A["default"].weight.grad, a.grad),
                         (layer.lora_B["default"].weight.grad, b.grad),
                         (layer.lora_magnitude_vector["default"].grad, m.grad)):
        assert rel_err(ours, theirs) < 1e-5


def _peft_dora(seed=0):
    pm = peft_model(tiny_model(), r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return pm.eval()


def test_a_peft_dora_adapter_loads_with_peft_s_logits_and_merges_as_peft_merges(tmp_path):
    pm = _peft_dora()
    pm.save_pretrained(str(tmp_path / "peft"))
    ids = token_ids()
    ours = tiny_model()
    load_adapter(ours, tmp_path / "peft")
    assert all(layer.is_dora("default") for _, layer in lora_layers(ours))
    assert rel_err(logits(ours, ids), logits(pm, ids)) < 1e-5
    # written back, PEFT reads the same adapter (the magnitude under PEFT's key)
    save_adapter(ours, tmp_path / "ours")
    from peft import PeftModel

    again = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "ours")).eval()
    assert rel_err(logits(again, ids), logits(pm, ids)) < 1e-5
    merge_and_unload(ours)
    theirs = pm.merge_and_unload()
    for name, module in theirs.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            assert rel_err(ours.get_submodule(name).weight, module.weight) < 1e-5, name
    assert rel_err(logits(ours, ids), logits(theirs, ids)) < 1e-5


def test_dora_gradients_equal_peft_s():
    pm = _peft_dora()
    ours = tiny_model()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["all-linear"], use_dora=True), initialise=False)
    prefix = "base_model.model."
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs = pm.get_submodule(prefix + name)
            layer.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(theirs.lora_B["default"].weight)
            layer.lora_magnitude_vector["default"].copy_(theirs.lora_magnitude_vector["default"].weight)
    ids = token_ids()
    ours.train(), pm.train()
    ours(input_ids=ids).logits.square().mean().backward()
    pm(input_ids=ids).logits.square().mean().backward()
    for name, layer in lora_layers(ours):
        theirs = pm.get_submodule(prefix + name)
        pairs = ((layer.lora_A["default"].weight, theirs.lora_A["default"].weight),
                 (layer.lora_B["default"].weight, theirs.lora_B["default"].weight),
                 (layer.lora_magnitude_vector["default"], theirs.lora_magnitude_vector["default"].weight))
        for mine, peft_param in pairs:
            assert rel_err(mine.grad, peft_param.grad) < 1e-4, name


def test_dora_on_a_4bit_base_equals_peft_on_transformers_bitsandbytes(tiny_llama_dir, tmp_path):
    import bitsandbytes as bnb
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import loraq

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), quantization_config=config).eval()
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                                   task_type="CAUSAL_LM"))
    ours = loraq.load_model(str(tiny_llama_dir), method="qlora", dtype="fp32").model
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["all-linear"], use_dora=True))
    # the magnitudes both start from: the norms of the 4-bit weights, computed by each from its own 4-bit base
    for name, layer in lora_layers(ours):
        theirs = pm.get_submodule("base_model.model." + name).lora_magnitude_vector["default"].weight
        assert rel_err(layer.lora_magnitude_vector["default"], theirs) < 1e-6, name
    pm.eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(tmp_path / "adapter"))
    fresh = loraq.load_model(str(tiny_llama_dir), method="qlora", dtype="fp32").model
    load_adapter(fresh, tmp_path / "adapter")
    ids = token_ids(vocab=min(VOCAB, fresh.config.vocab_size))
    assert rel_err(logits(fresh, ids), logits(pm, ids)) < 1e-5


def test_loraq_merge_of_a_peft_dora_adapter_equals_peft_s_merge_and_unload(tiny_llama_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    import loraq

    def base():
        return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()

    pm = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                                     task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    expected = pm.merge_and_unload().state_dict()
    loraq.merge(adapter=str(tmp_path / "adapter"), model=str(tiny_llama_dir), out=str(tmp_path / "merged"),
                dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).state_dict()
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        assert rel_err(merged[key], tensor) < 1e-5, key
