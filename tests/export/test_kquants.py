"""Q4_K / Q6_K blocks written by loraq, read back by the ``gguf`` package's own dequantizers (the reference).

1. Layout: random codes and scales packed by loraq dequantize, in gguf-py, to
   the format's formula evaluated here in float64 (``d sc q - dmin m`` for
   Q4_K, ``d sc (q - 32)`` for Q6_K): every bit lands where ggml reads it.
2. Quantization: on Gaussian weights with outliers, Q4_K (4.5 bits) is more
   accurate than gguf-py's Q4_0 (4.5 bits) and Q4_1 (5 bits), and Q6_K (6.56
   bits) more accurate than Q5_0 and Q5_1 (5.5, 6 bits): a worse fit or a
   mis-rounded scale would lose these comparisons.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from loraq.exporting.kquants import pack_q4_k, pack_q6_k, quantize_k


def test_q4_k_layout_matches_ggml():
    g = torch.Generator().manual_seed(0)
    n = 64
    d, dmin = torch.rand(n, generator=g).half().float(), torch.rand(n, generator=g).half().float()
    sc = torch.randint(0, 64, (n, 8), generator=g, dtype=torch.uint8)
    m = torch.randint(0, 64, (n, 8), generator=g, dtype=torch.uint8)
    q = torch.randint(0, 16, (n, 8, 32), generator=g, dtype=torch.uint8)
    blocks = pack_q4_k(d, dmin, sc, m, q).numpy()
    assert blocks.shape == (n, 144)
    got = quants.dequantize(blocks.reshape(1, -1), T.Q4_K).reshape(n, 8, 32)
    want = (d.double()[:, None, None] * sc.double()[..., None] * q.double()
            - dmin.double()[:, None, None] * m.double()[..., None])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)


def test_q6_k_layout_matches_ggml():
    g = torch.Generator().manual_seed(1)
    n = 64
    d = torch.rand(n, generator=g).half().float()
    sc = torch.randint(-128, 128, (n, 16), generator=g, dtype=torch.int8)
    q = torch.randint(0, 64, (n, 16, 16), generator=g, dtype=torch.uint8)
    blocks = pack_q6_k(d, sc, q).numpy()
    assert blocks.shape == (n, 210)
    got = quants.dequantize(blocks.reshape(1, -1), T.Q6_K).reshape(n, 16, 16)
    want = d.double()[:, None, None] * sc.double()[..., None] * (q.double() - 32)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)


def _relative_rmse(a: np.ndarray, qtype: T) -> float:
    data = quantize_k(a, qtype) if qtype in (T.Q4_K, T.Q6_K) else quants.quantize(a, qtype)
    back = quants.dequantize(data, qtype)
    return float(np.sqrt(((back - a) ** 2).mean() / (a ** 2).mean()))


@pytest.mark.parametrize("ours,theirs", [(T.Q4_K, (T.Q4_0, T.Q4_1)), (T.Q6_K, (T.Q5_0, T.Q5_1))])
def test_k_quants_beat_the_simple_quants_of_similar_size(ours, theirs):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((64, 1536)) * 0.05).astype(np.float32)
    a[:, ::97] *= 6  # a few large weights per row, as trained matrices have
    err = _relative_rmse(a, ours)
    for other in theirs:
        assert err < _relative_rmse(a, other), (ours.name, other.name)


def test_zero_and_constant_blocks_round_trip():
    a = np.zeros((2, 512), dtype=np.float32)
    a[1, 256:] = 0.5
    for qtype in (T.Q4_K, T.Q6_K):
        back = quants.dequantize(quantize_k(a, qtype), qtype)
        np.testing.assert_allclose(back, a, atol=2e-3)
