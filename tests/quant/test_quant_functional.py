"""NF4/FP4 blockwise quantization against bitsandbytes, byte for byte, and against float64 math."""
from __future__ import annotations

import pytest
import torch
from quant_helpers import bits, bnb_cpu_dequant_is_right

from loraq.errors import LoraqError
from loraq.quant import blockwise8, codes, reference
from loraq.quant.errors import QuantizationError
from loraq.quant.functional import (
    BLOCKSIZES,
    dequantize_4bit,
    dequantize_absmax,
    quantize_4bit,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd numel, a partial tail block, 1-D, single elements, exact multiples of every blocksize
SHAPES = [(37, 61), (1, 1), (7,), (3, 96), (24, 200), (2, 4096), (33, 64), (65, 33)]


def _assert_same_as_bnb(bnbf, w, blocksize, quant_type, double_quant):
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    ref_packed, ref = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                         compress_statistics=double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref_packed)
    assert state.absmax.dtype == ref.absmax.dtype and torch.equal(state.absmax, ref.absmax)
    assert state.shape == ref.shape and state.dtype == ref.dtype == w.dtype and state.blocksize == ref.blocksize
    assert torch.equal(bits(state.code), bits(ref.code))
    if double_quant:
        assert torch.equal(bits(state.offset), bits(ref.offset))
        assert torch.equal(bits(state.nested_absmax), bits(ref.state2.absmax))
        assert torch.equal(bits(state.nested_code), bits(ref.state2.code))
        bnb_absmax = bnbf.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
        assert torch.equal(bits(dequantize_absmax(state)), bits(bnb_absmax))
    else:
        assert state.offset is None and ref.state2 is None
    return packed, state, ref_packed, ref


def _float64_dequant(bnbf, packed, ref, dtype):
    """``code[nibble] * absmax`` from bnb's table and scales: exact in float64, rounded once to float32, then cast."""
    flat = packed.reshape(-1).long()
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: ref.shape.numel()]
    absmax = ref.absmax if ref.state2 is None else bnbf.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
    scale = absmax.double().repeat_interleave(ref.blocksize)[: ref.shape.numel()]
    return (ref.code.double()[nibbles] * scale).float().to(dtype).view(ref.shape)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_bytes_and_values_match_bitsandbytes(bnbf, blocksize, quant_type, dtype):
    gen = torch.Generator().manual_seed(blocksize + len(quant_type) + DTYPES.index(dtype))
    for i, shape in enumerate(SHAPES):
        w = (torch.randn(shape, generator=gen) * 0.05 * (i + 1)).to(dtype)
        double_quant = i % 3 != 2
        packed, state, ref_packed, ref = _assert_same_as_bnb(bnbf, w, blocksize, quant_type, double_quant)
        for out_dtype in {dtype, torch.bfloat16}:
            mine = dequantize_4bit(packed, state, out_dtype)
            assert mine.shape == w.shape and mine.dtype == out_dtype
            assert torch.equal(bits(mine), bits(_float64_dequant(bnbf, ref_packed, ref, out_dtype)))
        if bnb_cpu_dequant_is_right(w.shape, blocksize):
            theirs = bnbf.dequantize_4bit(ref_packed, ref)
            assert torch.equal(bits(dequantize_4bit(packed, state).view(theirs.shape)), bits(theirs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_blocks_and_tensors(bnbf, quant_type):
    w = torch.randn(10, 100)
    w[0] = 0.0  # whole blocks of zeros
    w.view(-1)[-40:] = 0.0  # an all-zero partial tail block (blocksize 64: 1000 = 15 * 64 + 40)
    for double_quant in (True, False):
        packed, state, ref_packed, ref = _assert_same_as_bnb(bnbf, w, 64, quant_type, double_quant)
        assert (dequantize_4bit(packed, state)[0] == 0).all()
        assert (dequantize_4bit(packed, state).view(-1)[-40:] == 0).all()
    zeros = torch.zeros(3, 256)
    packed, state, _, _ = _assert_same_as_bnb(bnbf, zeros, 64, quant_type, True)
    assert (dequantize_4bit(packed, state) == 0).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_exactly_on_code_boundaries_take_the_lower_code(bnbf, quant_type):
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    order = torch.sort(code, stable=True).indices
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    # a block scaled by exactly 1.0: the element 1.0 fixes absmax, the rest are midpoints and their float32 neighbours
    values = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
                        torch.nextafter(mids, torch.full_like(mids, -2.0))])
    w = torch.nn.functional.pad(values, (0, 64 - values.numel())).view(1, 64)
    packed, _state, _, _ = _assert_same_as_bnb(bnbf, w, 64, quant_type, False)
    flat = packed.view(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1).long()
    k = mids.numel()
    # the value AT a midpoint takes the lower code; one ulp above it the upper one; one ulp below the lower one
    assert torch.equal(code[nibbles[1:1 + k]], sorted_code[:-1])
    assert torch.equal(code[nibbles[1 + k:1 + 2 * k]], sorted_code[1:])
    assert torch.equal(code[nibbles[1 + 2 * k:1 + 3 * k]], sorted_code[:-1])


def test_code_tables_are_bitsandbytes_tables(bnbf):
    assert torch.equal(bits(codes.NF4_CODE), bits(bnbf.get_4bit_type("nf4", device="cpu")))
    assert torch.equal(bits(codes.FP4_CODE), bits(bnbf.get_4bit_type("fp4", device="cpu")))
    assert torch.equal(bits(codes.dynamic_map_signed()), bits(bnbf.create_dynamic_map(signed=True)))
    assert torch.equal(codes.NF4_CODE, torch.tensor([  # REFERENCE.md, independently of bitsandbytes
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]))


@pytest.mark.parametrize("n", [1, 255, 256, 257, 3000])
def test_nested_8bit_quantization_matches_bitsandbytes(bnbf, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 0.01
    if n > 600:
        x[256:512] = 0.0  # a block of zeros
    code = codes.dynamic_map_signed()
    q, absmax = blockwise8.quantize_blockwise_8bit(x, code, 256)
    ref_q, ref_state = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(q, ref_q) and torch.equal(bits(absmax), bits(ref_state.absmax))
    back = blockwise8.dequantize_blockwise_8bit(q, absmax, code, 256)
    assert torch.equal(bits(back), bits(bnbf.dequantize_blockwise(ref_q, ref_state)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_fast_paths_equal_the_plain_reference(quant_type, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    for shape, dtype in [((33, 61), torch.float32), ((9, 64), torch.bfloat16), ((129,), torch.float16)]:
        w = torch.randn(shape, generator=gen).to(dtype)
        w.view(-1)[:blocksize] = 0.0
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant=True)
        ref_packed, ref_qabsmax, ref_offset, ref_nested = reference.quantize_4bit(w, blocksize, quant_type, True)
        assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_qabsmax)
        assert torch.equal(bits(state.offset), bits(ref_offset))
        assert torch.equal(bits(state.nested_absmax), bits(ref_nested))
        absmax = reference.dequantize_absmax(state.absmax, state.offset, state.nested_absmax, state.nested_code)
        assert torch.equal(bits(absmax), bits(dequantize_absmax(state)))
        for out_dtype in DTYPES:
            ref_w = reference.dequantize_4bit(packed, absmax, state.code, blocksize, shape, out_dtype)
            assert torch.equal(bits(dequantize_4bit(packed, state, out_dtype)), bits(ref_w))
        plain_packed, plain_absmax, _, _ = reference.quantize_4bit(w, blocksize, quant_type, False)
        fast_packed, fast_state = quantize_4bit(w, blocksize, quant_type, double_quant=False)
        assert torch.equal(fast_packed, plain_packed) and torch.equal(bits(fast_state.absmax), bits(plain_absmax))


def test_nested_grid_lookup_equals_the_plain_reference():
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(700, generator=gen), torch.zeros(256), torch.linspace(-1, 1, 300)])
    code = codes.dynamic_map_signed()
    fast = blockwise8.quantize_blockwise_8bit(x, code, 256)
    plain = reference.quantize_blockwise_8bit(x, code, 256)
    assert torch.equal(fast[0], plain[0]) and torch.equal(bits(fast[1]), bits(plain[1]))


def test_double_quant_costs_0127_bits_per_parameter_at_blocksize_64():
    w = torch.randn(256, 4096)
    packed, state = quantize_4bit(w, 64, "nf4", True)
    bits_per_param = (packed.numel() * 8 + state.scale_bits) / w.numel()
    assert bits_per_param == 4 + 8 / 64 + 32 / (64 * 256)  # REFERENCE.md: 4.127
    assert round(bits_per_param, 3) == 4.127
    _, plain = quantize_4bit(w, 64, "nf4", False)
    assert (packed.numel() * 8 + plain.scale_bits) / w.numel() == 4.5


@pytest.mark.parametrize("bad, word", [
    (dict(blocksize=48), "blocksize"), (dict(blocksize=8192), "blocksize"), (dict(blocksize=16), "blocksize"),
    (dict(quant_type="int4"), "quant_type"),
])
def test_bad_settings_raise_one_line_value_errors(bad, word):
    with pytest.raises(QuantizationError) as info:
        quantize_4bit(torch.randn(4, 64), **bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LoraqError)
    assert word in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("w, word", [
    (torch.ones(4, 8, dtype=torch.int32), "dtype"),
    (torch.ones(0, 8), "empty"),
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
    (torch.tensor([[1.0, float("inf")]]), "inf"),
    (torch.ones(4, 8, dtype=torch.float64), "dtype"),
])
def test_bad_weights_name_the_layer(w, word):
    with pytest.raises(ValueError) as info:
        quantize_4bit(w, name="model.layers.3.mlp.up_proj")
    assert "model.layers.3.mlp.up_proj" in str(info.value) and word in str(info.value)


@pytest.mark.parametrize("chunk_bytes", [1, 96, 100, 1 << 18])
def test_chunked_cpu_dequantization_is_exact(bnbf, monkeypatch, chunk_bytes):
    import loraq.quant.functional as functional

    monkeypatch.setattr(functional, "CPU_CHUNK_BYTES", chunk_bytes)  # many chunks, ragged last chunk, one chunk
    gen = torch.Generator().manual_seed(chunk_bytes)
    for shape, blocksize in [((37, 61), 64), ((5, 300), 32), ((3, 1000), 256)]:
        w = torch.randn(shape, generator=gen)
        packed, state, ref_packed, ref = _assert_same_as_bnb(bnbf, w, blocksize, "nf4", True)
        for dtype in (torch.float32, torch.bfloat16):
            expected = bits(_float64_dequant(bnbf, ref_packed, ref, dtype))
            assert torch.equal(bits(dequantize_4bit(packed, state, dtype)), expected)
            buffer = torch.full((w.numel(),), float("nan"), dtype=dtype)  # written in place, every element
            into = functional.dequantize_4bit_eager(packed, state, dtype, out=buffer)
            assert into.data_ptr() == buffer.data_ptr() and torch.equal(bits(into), expected)
