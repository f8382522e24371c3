"""The generated dequantization kernel against the eager path and bitsandbytes, bit for bit."""
import pytest
import torch

from loraq.kernels.dequant import dequantize_fused
from loraq.quant.functional import dequantize_4bit_eager, quantize_4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((96, 64), 64), ((300, 256), 128), ((7, 4096), 4096), ((33, 32), 32)])
def test_fused_equals_eager_bitwise(quant_type, double_quant, dtype, shape, blocksize):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    w[0, :blocksize // 2] = 0  # a half-zero block
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    fused = dequantize_fused(packed, state, dtype)
    assert fused is not None, "the fused kernel should apply to whole blocks on the CPU"
    assert fused.dtype == dtype and fused.shape == w.shape
    assert torch.equal(fused, dequantize_4bit_eager(packed, state, dtype))


def test_fused_equals_bitsandbytes():
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(2))
    packed, state = quantize_4bit(w, 64, "nf4", True)
    q, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, q)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_fused(packed, state, dtype), bnbf.dequantize_4bit(q, s).to(dtype))


def test_partial_blocks_fall_back():
    packed, state = quantize_4bit(torch.randn(5, 13), 64, "nf4", True)
    assert dequantize_fused(packed, state, torch.float32) is None


def test_switched_off_by_environment(monkeypatch):
    from loraq.quant.functional import dequantize_4bit

    packed, state = quantize_4bit(torch.randn(64, 64), 64, "nf4", True)
    monkeypatch.setenv("LORAQ_COMPILE", "0")
    assert dequantize_fused(packed, state, torch.float32) is None
    assert torch.equal(dequantize_4bit(packed, state, torch.float32), dequantize_4bit_eager(packed, state, torch.float32))
