"""transformers' Conv1D (GPT-2's linear layer, weight stored [in, out]): LoRA, 4-bit, merging.

References: float64 formulas, PEFT's ``fan_in_fan_out`` LoRA layers and their merge, and transformers +
bitsandbytes' 4-bit conversion of the same model (bytes and logits).
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from family_configs import save_family
from loraq.lora.config import LoraConfig
from loraq.lora.layer import LoraLinear
from loraq.lora.model import inject_lora, lora_layers, merge_and_unload
from loraq.quant.linear import Linear4bit


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _conv1d_layer(in_f=128, out_f=96, r=4, alpha=12.0):
    torch.manual_seed(0)
    base = Conv1D(out_f, in_f)
    with torch.no_grad():
        base.bias.normal_(0, 0.1)
    layer = LoraLinear(base)
    layer.add_adapter("default", r, alpha)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, 0.3)
        layer.lora_B["default"].weight.normal_(0, 0.3)
    return layer


def _run(layer, x, g, fused):
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    if fused:
        assert layer._fused_forward(x) is not None, "a Conv1D base should take the one-node path"
        y = layer(x)
    else:
        y = layer._add_update(layer.base(x), x, "default")
    y.backward(g)
    return y.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


@pytest.mark.parametrize("fused", [True, False])
def test_lora_on_conv1d_matches_float64(fused):
    layer = _conv1d_layer()
    x, g = torch.randn(3, 5, 128), torch.randn(3, 5, 96)
    y, dx, da, db = _run(layer, x, g, fused)
    x64 = x.double().requires_grad_()
    a64 = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b64 = layer.lora_B["default"].weight.detach().double().requires_grad_()
    w = layer.base.weight.detach().double()  # [in, out]: y = x W + b
    ref = x64 @ w + layer.base.bias.detach().double() + 3.0 * (x64 @ a64.T) @ b64.T
    ref.backward(g.double())
    assert _rel(y, ref) < 1e-6
    for ours, theirs in ((dx, x64.grad), (da, a64.grad), (db, b64.grad)):
        assert _rel(ours, theirs) < 1e-5


def test_merging_a_conv1d_layer_keeps_the_conv1d_layout():
    layer = _conv1d_layer()
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = layer(x)
        layer.merge(torch.float32)
        assert isinstance(layer.base, Conv1D) and layer.base.weight.shape == (128, 96)
        assert _rel(layer(x), expected) < 1e-6
        layer.unmerge()
        assert _rel(layer(x), expected) < 1e-6


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer):
    return save_family("gpt2", tiny_tokenizer, tmp_path_factory.mktemp("gpt2"))


def _gpt2(gpt2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gpt2_dir), dtype=torch.float32).eval()


def _ids(vocab):
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(0))


def test_gpt2_lora_equals_peft_forward_gradients_and_merge(gpt2_dir):
    import peft

    ours = _gpt2(gpt2_dir)
    targets = inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["all-linear"]))
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"c_attn", "c_proj", "c_fc"}
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    theirs = peft.get_peft_model(_gpt2(gpt2_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  fan_in_fan_out=True, task_type="CAUSAL_LM"))
    prefix = "base_model.model."
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                mine = ours.get_submodule(name[len(prefix):])
                module.lora_A["default"].weight.copy_(mine.lora_A["default"].weight)
                module.lora_B["default"].weight.copy_(mine.lora_B["default"].weight)
    ids = _ids(ours.config.vocab_size)
    for m in (ours, theirs):  # GPT-2's own dropout off, so that both see the same function in training mode
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    out_ours, out_theirs = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert _rel(out_ours, out_theirs) < 1e-5
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for name, layer in lora_layers(ours):
        peft_layer = theirs.get_submodule(prefix + name)
        assert _rel(layer.lora_A["default"].weight.grad, peft_layer.lora_A["default"].weight.grad) < 1e-4
        assert _rel(layer.lora_B["default"].weight.grad, peft_layer.lora_B["default"].weight.grad) < 1e-4
    merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, module in merged_theirs.named_modules():
        if isinstance(module, Conv1D):
            mine = ours.get_submodule(name)
            assert isinstance(mine, Conv1D), name
            assert _rel(mine.weight, module.weight) < 1e-6, name


def _transformers_4bit(folder, compute_dtype):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # its plain dequantize + matmul path, not the bf16 kernel
    return model


def test_gpt2_4bit_is_transformers_bitsandbytes_byte_for_byte_both_ways(gpt2_dir, tiny_tokenizer, tmp_path):
    import bitsandbytes as bnb

    import loraq

    theirs = _transformers_4bit(gpt2_dir, torch.float32)
    ours = loraq.load_model(str(gpt2_dir), method="qlora", dtype="fp32").model
    converted = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert converted and {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)} == set(converted)
    for name, module in converted.items():
        mine = ours.get_submodule(name)
        assert mine.conv1d
        assert torch.equal(mine.weight.view(-1), module.weight.data.view(-1)), name
        assert torch.equal(mine.quant_state.absmax, module.weight.quant_state.absmax), name
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert _rel(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5
    # the folder transformers saves, read by loraq's bitsandbytes-folder loader without bitsandbytes
    theirs.save_pretrained(str(tmp_path / "bnb"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "bnb"))
    loaded = loraq.load_model(str(tmp_path / "bnb"), method="qlora", dtype="fp32").model
    assert all(loaded.get_submodule(n).conv1d for n in converted)
    with torch.no_grad():
        assert _rel(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5
    # and `loraq quantize` writes what transformers wrote, tensor for tensor
    loraq.quantize(model=str(gpt2_dir), out=str(tmp_path / "ours"), compute_dtype="fp32")
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        expected = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
