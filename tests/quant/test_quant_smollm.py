"""The issue's check on the real default model: `loraq quantize --model <SmolLM2 folder>` with defaults.

* every quantized layer's bytes equal bitsandbytes' for the same weights;
* 4.127 bits per parameter over the quantized layers;
* transformers loads the folder, and its logits equal those of transformers'
  own bitsandbytes quantization of the same model (and loraq's loaded model
  computes the same logits without bitsandbytes).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from loraq.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_quantized(smollm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm") / "q"
    assert main(["quantize", "--model", str(smollm_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def transformers_own(smollm_dir):
    """transformers' own bitsandbytes quantization of the same folder (NF4, double quant, bf16 compute)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm_dir), quantization_config=config).eval()


def test_every_layer_is_byte_identical_to_bitsandbytes_at_4127_bits(smollm_dir, smollm_quantized, transformers_own):
    theirs = transformers_own.state_dict()  # bitsandbytes' quantize_4bit of each weight, under bnb's keys
    marker = ".weight.quant_state.bitsandbytes__nf4"
    with safe_open(str(smollm_dir / "model.safetensors"), "pt") as src, \
            safe_open(str(smollm_quantized / "model.safetensors"), "pt") as dst:
        layers = sorted(k[: -len(marker)] for k in dst.keys() if k.endswith(marker))
        assert len(layers) == 30 * 7  # q, k, v, o, gate, up, down in each of 30 blocks
        assert layers == sorted(k[: -len(marker)] for k in theirs if k.endswith(marker))
        stored_bits = params = 0
        for name in layers:
            for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", marker[len(".weight"):]):
                key = name + ".weight" + suffix
                assert torch.equal(dst.get_tensor(key), theirs[key].cpu()), key
            meta = json.loads(bytes(dst.get_tensor(name + marker).numpy()))
            assert meta["shape"] == list(src.get_slice(name + ".weight").get_shape()) and meta["dtype"] == "float32"
            absmax, nested = dst.get_tensor(name + ".weight.absmax"), dst.get_tensor(name + ".weight.nested_absmax")
            stored_bits += 8 * dst.get_tensor(name + ".weight").numel() + 8 * absmax.numel() + 32 * nested.numel()
            params += meta["shape"][0] * meta["shape"][1]
        kept = [k for k in dst.keys() if not any(k.startswith(name + ".") for name in layers)]
        assert kept and all(torch.equal(dst.get_tensor(k), src.get_tensor(k)) for k in kept)  # embeddings, norms
    assert round(stored_bits / params, 3) == 4.127


def test_transformers_loads_it_as_its_own_quantization(smollm_quantized, transformers_own, monkeypatch):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    from loraq.models.load import load_model
    from loraq.quant.linear import Linear4bit

    ours_in_transformers = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_quantized)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm_quantized))
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours_in_transformers(ids).logits, transformers_own(ids).logits)
        # bitsandbytes' plain path (dequantize, then matmul), chosen before the first forward: the fused
        # AVX-512 kernel above repacks the weights and rounds activations to bf16
        plain_model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_quantized)).eval()
        for module in plain_model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        plain = plain_model(ids).logits
        # loraq's loader (no bitsandbytes inside), with transformers' mix: fp32 outside the 4-bit layers, bf16 in them
        ours = load_model(str(smollm_quantized), method="qlora", dtype="fp32", device="cpu").model
        # bit for bit needs the same summation order: loraq's decode product (held to float64 in
        # tests/kernels/test_gemv4.py) is set aside for the dequantize-then-matmul reference
        monkeypatch.setattr("loraq.quant.functional.products", list)
        for module in ours.modules():
            if isinstance(module, Linear4bit):
                module.compute_dtype = torch.bfloat16
        assert torch.equal(ours(ids).logits, plain)
    assert tokenizer.decode(plain[0, -1].argmax()) == " Rome"
