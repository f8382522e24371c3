"""The int8 head kernel (loraq.kernels.gemv8) against a float64 reference, every build this CPU can run.

Reference: ``x.double() @ (q.double() * s[:, None]).T``. The float path's codes widen exactly, so its error is
float32's: products, ``n`` sums and the row's scale, within ``(n + 2) u sum_j |x_j q_j s|`` (u = 2^-24). The
int16 path rounds each ``x`` row to ``x_q s_x`` (``s_x = max|x_row| / 32767``, at most ``s_x / 2`` off per
element) and sums exactly in int32, so ``(s_x / 2) sum_j |q_j s| + (n + 4) u sum_j (|x_j| + s_x) |q_j s|``.
bf16 output adds one rounding (2^-8 of the result and the bound).
"""
from __future__ import annotations

import platform

import pytest
import torch
from kernel_builds import build_each

from loraq.kernels import gemv8
from loraq.kernels.cbuild import cpu_flags
from loraq.quant.functional import SMALL_BATCH_ROWS

U32, U_BF16 = 2.0 ** -24, 2.0 ** -8
SHAPES = ((7, 33), (5, 100), (3, 4100), (64, 576), (1, 1))  # tails, a row past one int32 flush (4096 columns)
ROWS = (1, 2, 5, 9, 16)
X86 = platform.machine() == "x86_64"
AVX2 = X86 and "avx2" in cpu_flags().split() and "fma" in cpu_flags().split()
BUILDS = {"native": (("-march=native",), True), "scalar": (("-march=native", "-mno-avx2"), X86)}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    return build_each(tmp_path_factory, gemv8, BUILDS)


def assert_within(y, x, rows, path, what=""):
    w = rows.q.double() * rows.scale.double()[:, None]
    xd = x.double().reshape(-1, w.shape[1])
    ref = xd @ w.T
    n = w.shape[1]
    if path == "float":
        bound = (n + 2) * U32 * (xd.abs() @ w.abs().T)
    else:
        s_x = xd.abs().amax(dim=1, keepdim=True) / 32767
        bound = s_x / 2 * w.abs().sum(1) + (n + 4) * U32 * ((xd.abs() + s_x) @ w.abs().T)
    if x.dtype == torch.bfloat16:
        bound = bound + U_BF16 * (ref.abs() + bound)
    error = (y.double().reshape(ref.shape) - ref).abs()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0]), what
    worst = int((error - bound).flatten().argmax())
    assert bool((error <= bound).all()), (f"{what}: error {error.flatten()[worst].item():.3g} > bound "
                                          f"{bound.flatten()[worst].item():.3g}")


def test_from_weight_rounds_each_row_to_its_scale():
    w = torch.randn(9, 70, generator=torch.Generator().manual_seed(0)) * torch.arange(9)[:, None]  # row 0: zeros
    rows = gemv8.Int8Rows.from_weight(w.bfloat16())
    wf = w.bfloat16().double()
    s = wf.abs().amax(dim=1) / 127
    assert torch.allclose(rows.scale.double(), s, rtol=2 ** -23, atol=0) and rows.scale[0] == 0
    assert rows.q.dtype == torch.int8 and rows.q.abs().max() == 127 and (rows.q[0] == 0).all()
    err = (rows.dequantize().double() - wf).abs()
    assert (err <= s[:, None] * (0.5 + 2 ** -20)).all()
    with pytest.raises(ValueError, match="int8"):
        gemv8.Int8Rows(rows.q.float(), rows.scale)


@pytest.mark.parametrize("mode", ["float", "int16", "auto"])
@pytest.mark.parametrize("build", list(BUILDS))
def test_every_build_equals_float64_reference(libraries, build, mode):
    if build not in libraries:
        pytest.skip(f"this CPU cannot run the {build} build")
    want = "int16" if AVX2 and build == "native" and mode != "float" else "float"
    for s, (n_out, n_in) in enumerate(SHAPES):
        rows = gemv8.Int8Rows.from_weight(torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(s)))
        g = torch.Generator().manual_seed(50 + s)
        for r in ROWS:
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(r, n_in, generator=g) * 3).to(dtype)
                y, path = gemv8.product(x, rows, lib=libraries[build], mode=mode)
                assert path == want
                assert_within(y, x, rows, path, f"{n_out}x{n_in} rows={r} {dtype} {build} {mode}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rows_outliers_and_non_finite_x(libraries, dtype):
    rows = gemv8.Int8Rows.from_weight(torch.randn(300, 576, generator=torch.Generator().manual_seed(7)))
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(8))
    x[1] = 0
    x[2, 5] = 1000.0
    x = x.to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # 300 x 576 is above the threads' threshold: both halves written
    try:
        y, path = gemv8.product(x, rows, lib=libraries["native"])
    finally:
        torch.set_num_threads(before)
    assert (y[1] == 0).all()
    assert_within(y, x, rows, path, "zero row and outlier")
    x = x.float()
    x[3, 0] = float("nan")  # one NaN among finite values
    y, path = gemv8.product(x, rows, lib=libraries["native"], mode="int16")
    assert path == "float" and y[3].isnan().all() and torch.isfinite(y[:3]).all()


def test_does_not_apply(libraries, monkeypatch):
    rows = gemv8.Int8Rows.from_weight(torch.randn(8, 64))
    lib = libraries["native"]
    assert gemv8.int8_rows_matmul(torch.randn(1, 64).half(), rows, lib=lib) is None
    assert gemv8.int8_rows_matmul(torch.randn(SMALL_BATCH_ROWS + 1, 64), rows, lib=lib) is None
    assert gemv8.int8_rows_matmul(torch.randn(1, 32), rows, lib=lib) is None
    assert gemv8.int8_rows_matmul(torch.randn(1, 64, device="meta"), rows, lib=lib) is None
    y = gemv8.int8_rows_matmul(torch.randn(2, 3, 128)[..., ::2], rows, lib=lib)  # leading shape, strided
    assert y.shape == (2, 3, 8)
    monkeypatch.setenv("LORAQ_COMPILE", "0")
    assert gemv8.int8_rows_matmul(torch.randn(1, 64), rows) is None
