"""The C 4-bit product kernel (loraq.kernels.gemv4) against a float64 reference, every build this CPU can run.

Reference: ``x.double() @ W.double().T + bias`` with ``W = dequantize_4bit(packed, state, float32)``. The
kernel's weights are those same float32 values (the block's table scaled in float32, as the dequantization
does), ``x`` in bf16 widens exactly, so its only error is the float32 sum: for ``n = in_features`` products
and the bias, any order of summation stays within ``(n + 1) u sum_j |x_j w_j| + u |bias|`` (u = 2^-24, the
classic bound ``gamma_{n+1}``, first order), plus, for bf16 output, one rounding to bf16 (2^-8 relative).
A single wrong code in a row already breaks that bound tenfold (the negative control below).
"""
from __future__ import annotations

import logging
import platform

import pytest
import torch

import loraq.quant.functional as functional
from loraq.kernels import gemv4
from loraq.quant.functional import (
    BLOCKSIZES,
    SMALL_BATCH_ROWS,
    dequantize_4bit,
    matmul_4bit,
    quantize_4bit,
)
from loraq.quant.linear import Linear4bit

U32, U_BF16 = 2.0 ** -24, 2.0 ** -8
# odd in / out, in not a multiple of any blocksize, blocks that cross rows (in < blocksize), a one-element weight
SHAPES = ((7, 96), (13, 250), (5, 33), (9, 640), (3, 4160), (1, 1))
ROWS = (1, 2, 5, 9, 16)


def _cpu_has(flag: str) -> bool:
    from loraq.kernels.cbuild import cpu_flags

    return flag in cpu_flags().split()


X86 = platform.machine() == "x86_64"
# name -> the target flags of a build, and whether this CPU can run it
BUILDS = {
    "native": (("-march=native",), True),
    "avx2": (("-march=native", "-mno-avx512f"), X86 and _cpu_has("avx2") and _cpu_has("fma")),
    "scalar": (("-march=native", "-mno-avx2"), X86),
}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """Each build this CPU runs, compiled into a temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAQ_CACHE", str(tmp_path_factory.mktemp("gemv4-cache")))
        return {name: gemv4.build(flags) for name, (flags, runs) in BUILDS.items() if runs}


def reference_and_bound(x, packed, state, bias):
    """(float64 reference, the largest error float32 accumulation -- and a bf16 output's rounding -- allows)."""
    w = dequantize_4bit(packed, state, torch.float32).double()
    xd = x.double().reshape(-1, w.shape[1])
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    ref = xd @ w.T + b
    bound = (w.shape[1] + 1) * U32 * (xd.abs() @ w.abs().T) + U32 * b.abs()
    if x.dtype == torch.bfloat16:
        bound = bound + U_BF16 * (ref.abs() + bound)
    shape = (*x.shape[:-1], w.shape[0])
    return ref.view(shape), bound.view(shape)


def assert_within(y, x, packed, state, bias, what=""):
    ref, bound = reference_and_bound(x, packed, state, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape, what
    error = (y.double() - ref).abs()
    worst = int((error - bound).flatten().argmax())
    assert bool((error <= bound).all()), (f"{what}: error {error.flatten()[worst].item():.3g} > bound "
                                          f"{bound.flatten()[worst].item():.3g} at {worst}")


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_build_equals_float64_reference(libraries, build, blocksize, quant_type, double_quant):
    if build not in libraries:
        pytest.skip(f"this CPU cannot run the {build} build")
    lib = libraries[build]
    for s, (n_out, n_in) in enumerate(SHAPES):
        w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(s)) * (1 + s)
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
        g = torch.Generator().manual_seed(100 + s)
        for rows in ROWS:
            for dtype in (torch.float32, torch.bfloat16):
                for with_bias in (False, True):
                    x = (torch.randn(rows, n_in, generator=g) * 2).to(dtype)
                    bias = torch.randn(n_out, generator=g).to(dtype) if with_bias else None
                    y = gemv4.matmul_4bit_native(x, packed, state, bias, lib=lib)
                    assert y is not None
                    assert_within(y, x, packed, state, bias, f"{n_out}x{n_in} rows={rows} {dtype} bias={with_bias}")


def test_single_wrong_code_breaks_the_bound(libraries):
    """Negative control: the tolerance is tight enough to see one weight decoded one code off."""
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(1))
    packed, state = quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(2))
    wrong = packed.clone()
    wrong[3 * 288 + 100] ^= 0x10  # one high nibble of row 3, one code step off
    y = gemv4.matmul_4bit_native(x, wrong, state, lib=libraries["native"])
    ref, bound = reference_and_bound(x, packed, state, None)
    assert ((y.double() - ref).abs() > 10 * bound)[0, 3]


def test_any_leading_shape_and_strided_inputs(libraries):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(3))
    packed, state = quantize_4bit(w, 32, "fp4", True)
    x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(4))[..., ::2]  # not contiguous
    bias = torch.randn(80)[::2]
    y = gemv4.matmul_4bit_native(x, packed, state, bias, lib=libraries["native"])
    assert y.shape == (2, 3, 40)
    assert_within(y, x, packed, state, bias)


def test_output_rows_split_across_threads(libraries):
    """Above the kernel's size threshold the outputs are split between OpenMP threads; every one is written."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(301, 576, generator=torch.Generator().manual_seed(5))
        packed, state = quantize_4bit(w, 64, "nf4", True)
        for rows in (1, 16):
            x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            assert_within(gemv4.matmul_4bit_native(x, packed, state, lib=libraries["native"]), x, packed, state, None)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not X86, reason="an x86 build")
def test_avx512_build_compiles(tmp_path, monkeypatch):
    """The AVX-512F path builds everywhere; it runs (test_every_build_...'s native build) where the CPU has it."""
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path))
    assert gemv4.build(("-march=native", "-mavx512f")) is not None


def test_does_not_apply(libraries):
    lib = libraries["native"]
    packed, state = quantize_4bit(torch.randn(8, 64), 64, "nf4", True)
    x = torch.randn(1, 64)
    assert gemv4.matmul_4bit_native(x.half(), packed, state, lib=lib) is None
    assert gemv4.matmul_4bit_native(torch.randn(SMALL_BATCH_ROWS + 1, 64), packed, state, lib=lib) is None
    assert gemv4.matmul_4bit_native(x, packed, state, torch.randn(8).double(), lib=lib) is None
    assert gemv4.matmul_4bit_native(torch.randn(1, 32), packed, state, lib=lib) is None
    assert gemv4.matmul_4bit_native(x.to("meta"), packed, state, lib=lib) is None


def test_switched_off_or_no_compiler(monkeypatch, tmp_path, caplog):
    packed, state = quantize_4bit(torch.randn(8, 64), 64, "nf4", True)
    x = torch.randn(1, 64)
    monkeypatch.setenv("LORAQ_COMPILE", "0")
    assert gemv4.matmul_4bit_native(x, packed, state) is None
    monkeypatch.setenv("LORAQ_COMPILE", "1")
    monkeypatch.setattr(gemv4._LIBRARY, "tried", False)
    monkeypatch.setattr(gemv4._LIBRARY, "lib", None)
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="loraq.kernels.gemv4"):
        assert gemv4.matmul_4bit_native(x, packed, state) is None
        assert gemv4.matmul_4bit_native(x, packed, state) is None
    assert len([r for r in caplog.records if "native 4-bit matmul kernel unavailable" in r.message]) == 1
    assert_within(matmul_4bit(x, packed, state), x, packed, state, None)  # the reference answers


# --- the format's matmul_4bit and Linear4bit's use of it ---------------------------------------------------


@pytest.fixture
def product_calls(monkeypatch):
    """Records each call of a registered product that returned a result."""
    calls = []

    def spied():
        def wrap(fn):
            def product(*args):
                result = fn(*args)
                calls.append(result is not None)
                return result
            return product
        return [(name, wrap(fn)) for name, fn in products()]

    from loraq.quant.backends import products

    monkeypatch.setattr(functional, "products", spied)
    return calls


def test_matmul_4bit_every_shape_and_fallback(product_calls):
    """Registered product (conftest installs it) where it applies, the reference elsewhere; right either way."""
    for n_out, n_in in SHAPES:
        packed, state = quantize_4bit(torch.randn(n_out, n_in), 64, "nf4", True)
        for rows in (1, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1):
            x = torch.randn(rows, n_in)
            assert_within(matmul_4bit(x, packed, state), x, packed, state, None, f"{n_out}x{n_in} rows={rows}")
    assert any(product_calls)
    x = torch.randn(SMALL_BATCH_ROWS + 1, 64)
    packed, state = quantize_4bit(torch.randn(8, 64), 64, "nf4", True)
    assert torch.equal(matmul_4bit(x, packed, state),
                       torch.nn.functional.linear(x, dequantize_4bit(packed, state, torch.float32)))


def test_matmul_4bit_keeps_gradients(product_calls):
    packed, state = quantize_4bit(torch.randn(8, 64), 64, "nf4", True)
    x = torch.randn(2, 64, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    matmul_4bit(x, packed, state, bias).sum().backward()
    w = dequantize_4bit(packed, state, torch.float32)
    assert torch.allclose(x.grad, w.sum(0).expand(2, 64)) and torch.equal(bias.grad, torch.full((8,), 2.0))
    assert product_calls == []  # a graph was asked for: the reference ran


def test_matmul_4bit_without_storage():
    """The planner's fake tensors: the shape, no kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        packed, state = functional.placeholder_state((8, 64), 64, "nf4", True, torch.float32)
        assert matmul_4bit(torch.randn(1, 64), packed, state).shape == (1, 8)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_decoding_equals_training_path(compute_dtype, product_calls):
    torch.manual_seed(6)
    layer = Linear4bit.from_linear(torch.nn.Linear(576, 192), compute_dtype=compute_dtype).eval()
    x = torch.randn(1, 1, 576)
    trained = layer(x.clone().requires_grad_())  # the autograd function
    assert product_calls == [] and trained.grad_fn is not None
    with torch.no_grad():
        decoded = layer(x)
    assert product_calls == [True] and decoded.dtype == x.dtype
    xc = x.to(compute_dtype)
    ref, bound = reference_and_bound(xc, layer.weight, layer.quant_state, layer.bias.to(compute_dtype))
    assert ((decoded.double() - ref).abs() <= bound).all()
    # the training path rounds its weight to the compute dtype first (bf16: 2^-8 per weight)
    slack = bound + (U_BF16 if compute_dtype == torch.bfloat16 else U32) * (xc.double().abs() @ layer.dequantize(
        torch.float32).double().abs().T + ref.abs())
    assert ((decoded.double() - trained.detach().double()).abs() <= 2 * slack).all()


def test_linear4bit_training_keeps_the_autograd_function(product_calls):
    torch.manual_seed(7)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()
    w = layer.dequantize(torch.float32)
    assert torch.allclose(x.grad, w.sum(0, keepdim=True), rtol=1e-5, atol=1e-6)
    layer(torch.randn(1, 64))  # training mode, a frozen input: still the function, bit for bit as before
    assert product_calls == []
