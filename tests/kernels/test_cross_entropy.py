"""The generated cross-entropy chunk kernel against float64, and the loss with and without it."""
import pytest
import torch
import torch.nn.functional as F

from loraq.kernels.cross_entropy import ce_grad_fused
from loraq.training.loss import fused_linear_cross_entropy


def _logits(dtype, rows=9, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    return z, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generated_chunk_matches_float64(dtype):
    z, y = _logits(dtype)
    z64 = z.double().requires_grad_()
    ref = F.cross_entropy(z64, y, reduction="sum")
    (ref * 0.25).backward()

    out = z.clone()
    loss = ce_grad_fused(out, y, 0.25)
    assert loss is not None, "kernels are on by default on the CPU"
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    # the gradient is rounded once to the logits' dtype
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=8e-3, atol=1e-6)}[dtype]
    torch.testing.assert_close(out.double(), z64.grad.to(dtype).double(), **tol)


def test_loss_same_with_kernels_off(monkeypatch):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 24, generator=g).bfloat16()
    w = (torch.randn(500, 24, generator=g) * 0.3).bfloat16()
    y = torch.randint(0, 500, (40,), generator=g)

    def run():
        x = h.clone().requires_grad_()
        loss = fused_linear_cross_entropy(x, w, y, chunk_rows=16)
        loss.backward()
        return loss.detach(), x.grad

    fast_loss, fast_grad = run()
    monkeypatch.setenv("LORAQ_COMPILE", "0")
    assert ce_grad_fused(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0) is None
    eager_loss, eager_grad = run()
    torch.testing.assert_close(fast_loss, eager_loss, rtol=1e-6, atol=1e-6)
    # dlogits agree to a bf16 rounding; dh = dlogits W then differs by at most a few of them
    torch.testing.assert_close(fast_grad.float(), eager_grad.float(), rtol=2e-2, atol=1e-4)
