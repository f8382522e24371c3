"""Lean RMSNorm (three forms) and gated activations (SiLU, GeLU-tanh): forward bit-identical to transformers'
modules, backward equal to float64 autograd."""
import copy

import pytest
import torch

from loraq.kernels.families import apply_norm_gate_modules
from loraq.kernels.norm_gate import GatedActFunction, RMSNormFunction, reference_gated, reference_rmsnorm

FORMS = {"cast_then_scale": ("llama", "LlamaRMSNorm"), "scale_then_cast": ("olmo2", "Olmo2RMSNorm"),
         "offset_scale": ("gemma2", "Gemma2RMSNorm")}


def _transformers_norm(form: str, size: int, eps: float):
    import importlib

    family, cls = FORMS[form]
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(module, cls)(size, eps=eps)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_and_float64(form, dtype):
    g = torch.Generator().manual_seed(0)
    norm = _transformers_norm(form, 48, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    x = (torch.randn(3, 7, 48, generator=g) * 2).to(dtype).requires_grad_()
    y = RMSNormFunction.apply(x, norm.weight, 1e-5, form)
    assert torch.equal(y, norm(x))  # the same operations forward
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    reference_rmsnorm(x64, norm.weight.detach(), 1e-5, form).backward(dy.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_rmsnorm_weight_gradient_float64(form):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g)
    w = (torch.rand(16, generator=g) + 0.5).requires_grad_()
    RMSNormFunction.apply(x, w, 1e-6, form).sum().backward()  # computes in float32, as transformers does
    w64 = w.detach().double().requires_grad_()
    reference_rmsnorm(x, w64, 1e-6, form).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activation_matches_transformers_and_float64(activation, dtype):
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(2)
    a = (torch.randn(4, 33, generator=g) * 3).to(dtype).requires_grad_()
    b = torch.randn(4, 33, generator=g).to(dtype).requires_grad_()
    h = GatedActFunction.apply(a, b, activation)
    act = ACT2FN["silu" if activation == "silu" else "gelu_pytorch_tanh"]
    assert torch.equal(h, act(a) * b)
    dh = torch.randn(h.shape, generator=g).to(dtype)
    h.backward(dh)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    reference_gated(a64, b64, activation).backward(dh.double())
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
