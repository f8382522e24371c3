"""Lean RMSNorm and SiLU*mul: forward bit-identical to transformers, backward equal to float64 autograd."""
import copy

import pytest
import torch
import torch.nn.functional as F

from loraq.kernels.norm_gate import (
    RMSNormFunction,
    SiluMulFunction,
    apply_norm_gate_modules,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_and_float64(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    x = (torch.randn(3, 7, 48, generator=g) * 2).to(dtype).requires_grad_()
    y = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    assert torch.equal(y, norm(x))  # the same operations forward
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double()
    ref = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    ref.backward(dy.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)


def test_rmsnorm_weight_gradient_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g)
    w = (torch.rand(16, generator=g) + 0.5).requires_grad_()
    RMSNormFunction.apply(x, w, 1e-6).sum().backward()  # computes in float32, as transformers does
    x64, w64 = x.double(), w.detach().double().requires_grad_()
    (w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_float64(dtype):
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(4, 33, generator=g) * 3).to(dtype).requires_grad_()
    b = torch.randn(4, 33, generator=g).to(dtype).requires_grad_()
    h = SiluMulFunction.apply(a, b)
    assert torch.equal(h, F.silu(a) * b)
    dh = torch.randn(h.shape, generator=g).to(dtype)
    h.backward(dh)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    (F.silu(a64) * b64).backward(dh.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.grad.double(), a64.grad, **tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, **tol)


def test_patched_llama_gives_transformers_logits_and_grads(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    ours = copy.deepcopy(ref)
    assert apply_norm_gate_modules(ours) == 2 * 2 + 1 + 2  # 2 norms + 1 MLP per layer, the final norm
    ids = torch.randint(3, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = ref(input_ids=ids).logits, ours(input_ids=ids).logits
    assert torch.equal(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
