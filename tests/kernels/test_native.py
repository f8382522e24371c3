"""The C dequantization kernel: rounding edge cases and fallbacks (bitwise equality: test_dequant.py)."""
import logging
import platform

import pytest
import torch

import loraq.kernels.native as native
from loraq.kernels.native import dequantize_native
from loraq.quant.functional import dequantize_4bit, dequantize_4bit_eager, quantize_4bit


def test_tiny_scales_round_like_pytorch():
    """Products below float32's normal range (subnormal) must round to bf16 as PyTorch does, not flush to zero."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) * 1e-37
    packed, state = quantize_4bit(w, 64, "nf4", False)
    out = dequantize_native(packed, state, torch.bfloat16)
    ref = dequantize_4bit_eager(packed, state, torch.bfloat16)
    assert (ref.float().abs() < torch.finfo(torch.float32).tiny).sum() > 100  # the case is really exercised
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_into_a_given_buffer(dtype):
    packed, state = quantize_4bit(torch.randn(48, 64, generator=torch.Generator().manual_seed(5)), 64, "nf4", True)
    buffer = torch.full((48 * 64,), float("nan"), dtype=dtype)
    out = dequantize_native(packed, state, dtype, out=buffer)
    assert out.data_ptr() == buffer.data_ptr() and out.shape == (48, 64)
    assert torch.equal(out, dequantize_4bit_eager(packed, state, dtype))
    with pytest.raises(ValueError, match="contiguous"):  # the contract's check, before any kernel writes
        dequantize_4bit(packed, state, dtype, out=torch.empty(10, dtype=dtype))


def test_nan_scale_gives_nan_where_eager_does():
    packed, state = quantize_4bit(torch.randn(32, 64, generator=torch.Generator().manual_seed(4)), 64, "nf4", False)
    state.absmax[5] = float("nan")
    out = dequantize_native(packed, state, torch.bfloat16)
    ref = dequantize_4bit_eager(packed, state, torch.bfloat16)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 64
    assert torch.equal(out[~out.isnan()], ref[~ref.isnan()])


def test_does_not_apply_to_float16_or_partial_blocks():
    packed, state = quantize_4bit(torch.randn(64, 64), 64, "nf4", True)
    assert dequantize_native(packed, state, torch.float16) is None
    packed, state = quantize_4bit(torch.randn(5, 13), 64, "nf4", True)
    assert dequantize_native(packed, state, torch.float32) is None


def test_without_a_compiler_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native._LIBRARY, "tried", False)
    monkeypatch.setattr(native._LIBRARY, "lib", None)
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    packed, state = quantize_4bit(torch.randn(64, 64), 64, "nf4", True)
    with caplog.at_level(logging.WARNING, logger="loraq.kernels.native"):
        assert dequantize_native(packed, state, torch.bfloat16) is None
        assert dequantize_native(packed, state, torch.bfloat16) is None
    assert len([r for r in caplog.records if "native dequantization kernel unavailable" in r.message]) == 1
    assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16),
                       dequantize_4bit_eager(packed, state, torch.bfloat16))
    assert not list(tmp_path.rglob("*.so"))


def test_switched_off_by_environment(monkeypatch):
    packed, state = quantize_4bit(torch.randn(64, 64), 64, "nf4", True)
    monkeypatch.setenv("LORAQ_COMPILE", "0")
    assert dequantize_native(packed, state, torch.float32) is None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds the portable x86-64 variant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_build_without_avx512_equals_eager(dtype, monkeypatch, tmp_path):
    """The plain C loop (what CPUs without AVX-512 run) against the eager path, bit for bit."""
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path))
    lib = native._build(("-march=x86-64",))
    for quant_type, double_quant in (("nf4", True), ("fp4", False)):
        w = torch.randn(300, 256, generator=torch.Generator().manual_seed(5)) * 3
        packed, state = quantize_4bit(w, 64, quant_type, double_quant)
        out = dequantize_native(packed, state, dtype, lib=lib)
        ref = dequantize_4bit_eager(packed, state, dtype)
        assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
