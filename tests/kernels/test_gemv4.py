"""The C 4-bit product kernel (loraq.kernels.gemv4) against a float64 reference, every build this CPU can run.

Reference: ``x.double() @ W.double().T + bias`` with ``W = dequantize_4bit(packed, state, float32)``.

The float path: the kernel's weights are those same float32 values (the block's table scaled in float32, as the
dequantization does), ``x`` in bf16 widens exactly, so its only error is the float32 sum: for ``n =
in_features`` products and the bias, any order of summation stays within ``(n + 1) u sum_j |x_j w_j| + u |bias|``
(u = 2^-24, the classic bound ``gamma_{n+1}``, first order), plus, for bf16 output, one rounding to bf16 (2^-8
relative).

The int16 path (the default on AVX2 without AVX-512F) rounds the codes to ``c_q / 2^13`` (at most 2^-14 off, so
a weight at most ``2^-14 |s_j|`` off, s_j its block's scale) and ``x`` to ``x_q s_x`` with ``s_x = max|x_row| /
32767`` (at most ``s_x / 2`` off per element); its integer sums are exact and the rest is float32. So::

    |error| <= 2^-14 sum_j |x_j| |s_j| + (s_x / 2) sum_j (|w_j| + 2^-14 |s_j|)
               + (n + 6) u sum_j (|x_j| + s_x) (|w_j| + 2^-14 |s_j|)

(the last line: float32 sums, products and conversions, the float32 rounding of ``W`` and of ``s_x``), plus
the bias and bf16 output terms as above. For the random data below the first line (the quantization) stays
under 2^-10 of ``sum_j |x_j w_j|``, half of bf16's unit roundoff 2^-9 (checked; it nears that only for a row
of small weights in a block with a large scale, blocks crossing rows); for a row with one value 1000x the others the
activation term grows with ``max|x|`` (the outlier test).
A single wrong code in a row already breaks either bound (the negative control below).
"""
from __future__ import annotations

import logging
import platform

import pytest
import torch
from kernel_builds import build_each

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
DEFAULT_BOUND = "int16"  # the default path's bound where either path may run (it is the looser one)


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
    return build_each(tmp_path_factory, gemv4, BUILDS)


def reference_and_bound(x, packed, state, bias, path="float"):
    """(float64 reference, the largest error the kernel's ``path`` -- and a bf16 output's rounding -- allows)."""
    w = dequantize_4bit(packed, state, torch.float32).double()
    xd = x.double().reshape(-1, w.shape[1])
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    ref = xd @ w.T + b
    if path == "float":
        bound = (w.shape[1] + 1) * U32 * (xd.abs() @ w.abs().T) + U32 * b.abs()
    else:
        bound = int16_bound(xd, w, state) + U32 * b.abs()
    if x.dtype == torch.bfloat16:
        bound = bound + U_BF16 * (ref.abs() + bound)
    shape = (*x.shape[:-1], w.shape[0])
    return ref.view(shape), bound.view(shape)


def int16_bound(xd, w, state, rounding=True):
    """The int16 path's bound (module docstring), without the bias; ``rounding=False``: its quantization terms
    alone (no float32 sums)."""
    s = functional.dequantize_absmax(state).double().repeat_interleave(state.blocksize)[: w.numel()].view(w.shape)
    s_x = xd.abs().amax(dim=1, keepdim=True) / 32767
    code_err = 2.0 ** -14 * s.abs()
    quantized = s_x / 2 * (w.abs() + code_err).sum(1) + xd.abs() @ code_err.T
    if not rounding:
        return quantized
    return quantized + (w.shape[1] + 6) * U32 * ((xd.abs() + s_x) @ (w.abs() + code_err).T)


def assert_within(y, x, packed, state, bias, what="", path="float"):
    ref, bound = reference_and_bound(x, packed, state, bias, path)
    assert y.dtype == x.dtype and y.shape == ref.shape, what
    error = (y.double() - ref).abs()
    worst = int((error - bound).flatten().argmax())
    assert bool((error <= bound).all()), (f"{what}: error {error.flatten()[worst].item():.3g} > bound "
                                          f"{bound.flatten()[worst].item():.3g} at {worst}")


def int16_applies(build, n_in, blocksize, mode):
    """Whether ``mode`` runs the int16 path in ``build`` for this shape (this CPU: no AVX-512F, so the native
    build's default is int16 where it has AVX2)."""
    if build == "scalar" or not BUILDS["avx2"][1] or n_in % 2 or blocksize % 2 or mode == "float":
        return False
    return mode == "int16" or not _cpu_has("avx512f")


@pytest.mark.parametrize(("build", "mode"), [("native", "auto"), ("native", "float"), ("avx2", "int16"),
                                             ("avx2", "float"), ("scalar", "auto")])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_build_equals_float64_reference(libraries, build, blocksize, quant_type, double_quant, mode):
    if build not in libraries:
        pytest.skip(f"this CPU cannot run the {build} build")
    lib = libraries[build]
    for s, (n_out, n_in) in enumerate(SHAPES):
        w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(s)) * (1 + s)
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
        g = torch.Generator().manual_seed(100 + s)
        want = "int16" if int16_applies(build, n_in, blocksize, mode) else "float"
        wd = dequantize_4bit(packed, state, torch.float32).double()
        for rows in ROWS:
            for dtype in (torch.float32, torch.bfloat16):
                for with_bias in (False, True):
                    x = (torch.randn(rows, n_in, generator=g) * 2).to(dtype)
                    bias = torch.randn(n_out, generator=g).to(dtype) if with_bias else None
                    y, path = gemv4.product(x, packed, state, bias, lib=lib, mode=mode)
                    assert path == want
                    what = f"{n_out}x{n_in} rows={rows} {dtype} bias={with_bias} {path}"
                    assert_within(y, x, packed, state, bias, what, path)
                    if path == "int16" and dtype == torch.float32:  # the rounding of x and codes: < 2^-10
                        xd = x.double()
                        ratio = int16_bound(xd, wd, state, rounding=False) / (xd.abs() @ wd.abs().T)
                        assert (ratio <= 2.0 ** -10).all(), f"{what}: {ratio.max().item():.3g}"


@pytest.mark.parametrize("build", ["native", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int16_zero_rows_and_outliers(libraries, build, dtype):
    """A row of zeros (s_x = 0: the bias alone), a row with one value 1000x the rest (its bound grows with
    max|x|, the error stays inside it), rows with inf / NaN and rows too small or large to scale (the float path
    runs, with IEEE results)."""
    if build not in libraries:
        pytest.skip(f"this CPU cannot run the {build} build")
    lib = libraries[build]
    w = torch.randn(70, 576, generator=torch.Generator().manual_seed(8))
    packed, state = quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(9))
    x[1] = 0
    x[3, 17] = 1000.0
    x = x.to(dtype)
    bias = torch.randn(70).to(dtype)
    y, path = gemv4.product(x, packed, state, bias, lib=lib, mode="int16")
    assert path == "int16" and torch.equal(y[1], bias)
    assert_within(y, x, packed, state, bias, "zero row and outlier", "int16")
    for special in (float("inf"), float("nan"), 1e-31, 1e31):
        xs = x.float().clone()
        if special == 1e-31:
            xs[2] *= 1e-32  # the whole row tiny
        else:
            xs[2, 3] = special  # one value among finite ones
        y, path = gemv4.product(xs, packed, state, lib=lib, mode="int16")
        assert path == "float", special
        if special in (1e-31, 1e31):
            assert_within(y, xs, packed, state, None, f"x {special}")
        else:
            assert not torch.isfinite(y[2]).any() and torch.isfinite(y[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("mode", ["float", "int16"])
def test_single_wrong_code_breaks_the_bound(libraries, mode):
    """Negative control: the tolerance is tight enough to see one weight decoded one code off (the int16 bound
    is the looser one: 4x its bound here, the other rows' errors under 3% of theirs)."""
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(1))
    packed, state = quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(2))
    wrong = packed.clone()
    wrong[3 * 288 + 100] ^= 0x10  # one high nibble of row 3, one code step off
    y, path = gemv4.product(x, wrong, state, lib=libraries["native"], mode=mode)
    ref, bound = reference_and_bound(x, packed, state, None, path)
    assert ((y.double() - ref).abs() > (10 if path == "float" else 3) * bound)[0, 3]  # int16: ~4x


def test_any_leading_shape_and_strided_inputs(libraries):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(3))
    packed, state = quantize_4bit(w, 32, "fp4", True)
    x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(4))[..., ::2]  # not contiguous
    bias = torch.randn(80)[::2]
    y, path = gemv4.product(x, packed, state, bias, lib=libraries["native"])
    assert y.shape == (2, 3, 40)
    assert_within(y, x, packed, state, bias, path=path)


def test_output_rows_split_across_threads(libraries):
    """Above the kernel's size threshold the outputs are split between OpenMP threads; every one is written."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(301, 576, generator=torch.Generator().manual_seed(5))
        packed, state = quantize_4bit(w, 64, "nf4", True)
        for rows in (1, 16):
            x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            for mode in ("float", "int16"):
                y, path = gemv4.product(x, packed, state, lib=libraries["native"], mode=mode)
                assert_within(y, x, packed, state, None, mode, path)
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
            assert_within(matmul_4bit(x, packed, state), x, packed, state, None, f"{n_out}x{n_in} rows={rows}",
                          DEFAULT_BOUND)
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
    ref, bound = reference_and_bound(xc, layer.weight, layer.quant_state, layer.bias.to(compute_dtype), DEFAULT_BOUND)
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
