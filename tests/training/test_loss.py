"""The fused head + cross-entropy against the plain formula (float64 and torch's own CE)."""
import pytest
import torch
import torch.nn.functional as F

from loraq.training.loss import IGNORE_INDEX, fused_linear_cross_entropy, shift_targets


def _case(dtype, n=37, d=16, v=101, seed=0, train_head=False, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_(train_head)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_(train_head) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = IGNORE_INDEX
    return h, w, b, y


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_matches_float64_cross_entropy_and_grads(train_head, bias, chunk):
    h, w, b, y = _case(torch.float32, train_head=train_head, bias=bias)
    loss = fused_linear_cross_entropy(h, w, y, bias=b, chunk_rows=chunk)
    (loss * 2.5).backward()  # a non-unit upstream gradient

    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(train_head)
    b64 = b.detach().double().requires_grad_(train_head) if bias else None
    ref = F.cross_entropy(F.linear(h64, w64, b64), y, ignore_index=IGNORE_INDEX)
    (ref * 2.5).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    if train_head:
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
        if bias:
            torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)


def test_bf16_close_to_fp32_reference():
    h, w, _, y = _case(torch.bfloat16, n=64, d=32, v=300)
    loss = fused_linear_cross_entropy(h, w, y, chunk_rows=16)
    loss.backward()
    h32 = h.detach().float().requires_grad_()
    ref = F.cross_entropy(F.linear(h32, w.detach().float()), y, ignore_index=IGNORE_INDEX)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    cos = F.cosine_similarity(h.grad.float().flatten(), h32.grad.flatten(), dim=0)
    assert cos > 0.99


def test_explicit_normalizer_and_no_grad_rows():
    h, w, _, y = _case(torch.float32)
    loss = fused_linear_cross_entropy(h, w, y, normalizer=1000.0)
    ref = F.cross_entropy(h.detach() @ w.t(), y, ignore_index=IGNORE_INDEX, reduction="sum") / 1000.0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert torch.all(h.grad[::3] == 0)  # ignored rows get exactly no gradient


def test_shift_targets_matches_hf_convention():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [1, 2, 3, 4]])
    assert shift_targets(labels).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX], [2, 3, 4, IGNORE_INDEX]]


def test_matches_transformers_loss_on_a_causal_lm(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    hf = model(input_ids=ids, labels=labels).loss
    hidden = model.model(input_ids=ids).last_hidden_state
    ours = fused_linear_cross_entropy(hidden, model.lm_head.weight, shift_targets(labels))
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


def test_no_grad_mode_computes_loss_only():
    h, w, _, y = _case(torch.float32, train_head=True)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y)
    ref = F.cross_entropy(h.detach() @ w.detach().t(), y, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    assert not loss.requires_grad


def test_frozen_head_changed_in_place_is_seen():
    """The head's transposed copy (a speed-up for frozen heads) follows in-place changes of the weight."""
    from loraq.training.loss import LossBuffers

    buffers = LossBuffers()  # kept across calls, as a run's loss module keeps them
    h, w, _, y = _case(torch.float32, n=20, d=8, v=50)
    for _ in range(2):
        x = h.detach().clone().requires_grad_()
        fused_linear_cross_entropy(x, w.detach(), y, buffers=buffers).backward()
        x64 = h.detach().double().requires_grad_()
        F.cross_entropy(x64 @ w.detach().double().t(), y, ignore_index=IGNORE_INDEX).backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            w.mul_(-2.0)  # same storage, new version: the next loss must use the new values
