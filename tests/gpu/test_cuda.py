"""CUDA checks, run where a GPU is present (skipped elsewhere: tests marked `gpu`, see tests/conftest.py).

Each compares loraq on the GPU with an independent reference: bitsandbytes' CUDA
kernels, transformers + bitsandbytes' 4-bit model, a float64 product on the CPU.
"""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_on_cuda_is_byte_identical_to_bitsandbytes_cuda(quant_type, dtype):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from loraq.quant.functional import dequantize_4bit, quantize_4bit

    w = (torch.randn(1000, 333, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype).cuda()
    packed, state = quantize_4bit(w, 64, quant_type, double_quant=True)
    ref_packed, ref = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed.view(-1).cpu(), ref_packed.view(-1).cpu())
    assert torch.equal(state.absmax.cpu(), ref.absmax.cpu())
    assert torch.equal(state.nested_absmax.cpu(), ref.state2.absmax.cpu())
    assert torch.equal(dequantize_4bit(packed, state, dtype).cpu(), bnbf.dequantize_4bit(ref_packed, ref).cpu())


@pytest.mark.parametrize("double_quant", [True, False])
def test_generated_dequantization_on_cuda_equals_the_eager_path(double_quant):
    from loraq.kernels.dequant import dequantize_generated
    from loraq.quant.functional import dequantize_4bit_eager, quantize_4bit

    w = (torch.randn(1536, 576, generator=torch.Generator().manual_seed(2)) * 0.02).cuda()
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=double_quant)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        fused = dequantize_generated(packed, state, dtype)
        assert fused is not None and fused.is_cuda
        assert torch.equal(fused, dequantize_4bit_eager(packed, state, dtype))


def test_linear4bit_on_cuda_matches_a_float64_product():
    """Forward and input gradient in bf16 on CUDA against float64 on the CPU with the dequantized weight
    (the CPU dequantization is held bitwise to bitsandbytes by tests/quant)."""
    from torch import nn

    from loraq.quant.linear import Linear4bit

    torch.manual_seed(0)
    linear = nn.Linear(576, 1536)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    w64 = layer.dequantize(torch.float32).double()
    layer = layer.cuda()
    x = torch.randn(4, 32, 576, dtype=torch.bfloat16).cuda().requires_grad_(True)
    grad_out = torch.randn(4, 32, 1536)
    y = layer(x)
    y.backward(grad_out.to("cuda", torch.bfloat16))
    x64 = x.detach().cpu().double()
    expected = x64 @ w64.T + linear.bias.detach().double()
    assert (y.detach().cpu().double() - expected).abs().max() / expected.abs().max() < 2e-2
    expected_grad = grad_out.to(torch.bfloat16).double() @ w64
    assert (x.grad.cpu().double() - expected_grad).abs().max() / expected_grad.abs().max() < 2e-2


def test_qlora_model_on_cuda_gives_transformers_bitsandbytes_logits(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import loraq

    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    ours = loraq.load_model(str(tiny_llama_dir), method="qlora", dtype="fp32", device="cuda").model.eval()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), quantization_config=bnb, dtype=torch.float32,
                                               device_map={"": 0}).eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    assert (a - b).abs().max() / b.abs().max() < 1e-4


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_training_on_cuda_lowers_the_loss_and_writes_a_finite_adapter(tiny_llama_dir, tmp_path, method):
    from safetensors.torch import load_file

    from loraq.cli import main

    data = tmp_path / "chat.jsonl"
    with open(data, "w") as fh:
        for i in range(32):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Count {i}"},
                                              {"role": "assistant", "content": f"{i} {i + 1} {i + 2}"}]}) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--method", method,
                 "--dtype", "bf16", "--max-steps", "12", "--batch-size", "8", "--seq-len", "64", "--lr", "1e-2",
                 "--eval-samples", "0", "--eval-every", "0", "--output-dir", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peak_memory_bytes"] > 0
