"""The generated and the C dequantization kernels against the eager path and bitsandbytes, bit for bit."""
import pytest
import torch

from loraq.kernels.dequant import dequantize_generated
from loraq.kernels.native import dequantize_native
from loraq.quant.functional import dequantize_4bit_eager, quantize_4bit


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("kernel,dtype", [(dequantize_generated, torch.float32), (dequantize_generated, torch.bfloat16),
                                          (dequantize_generated, torch.float16), (dequantize_native, torch.float32),
                                          (dequantize_native, torch.bfloat16)], ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("shape,blocksize", [((96, 64), 64), ((300, 256), 128), ((7, 4096), 4096), ((33, 32), 32),
                                             ((1536, 576), 64)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_kernel_equals_eager_bitwise(quant_type, double_quant, kernel, dtype, shape, blocksize, n_threads, threads):
    """The generated (Inductor) and the C kernel against the eager path, with 1 and 2 threads."""
    threads(n_threads)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    w[0, :blocksize // 2] = 0  # a half-zero block
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    out = kernel(packed, state, dtype)
    assert out is not None, "the kernel should apply to whole blocks on the CPU"
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(_bits(out), _bits(dequantize_4bit_eager(packed, state, dtype)))


@pytest.mark.parametrize("kernel", [dequantize_generated, dequantize_native], ids=lambda f: f.__name__)
def test_kernel_equals_bitsandbytes(kernel):
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(2))
    packed, state = quantize_4bit(w, 64, "nf4", True)
    q, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, q)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(kernel(packed, state, dtype), bnbf.dequantize_4bit(q, s).to(dtype))


def test_partial_blocks_fall_back():
    packed, state = quantize_4bit(torch.randn(5, 13), 64, "nf4", True)
    assert dequantize_generated(packed, state, torch.float32) is None


def test_switched_off_by_environment(monkeypatch):
    from loraq.quant.functional import dequantize_4bit

    packed, state = quantize_4bit(torch.randn(64, 64), 64, "nf4", True)
    monkeypatch.setenv("LORAQ_COMPILE", "0")
    assert dequantize_generated(packed, state, torch.float32) is None
    assert torch.equal(dequantize_4bit(packed, state, torch.float32),
                       dequantize_4bit_eager(packed, state, torch.float32))
