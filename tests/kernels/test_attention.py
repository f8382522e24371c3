"""The matmul attention against the float64 definition, and inside a transformers Llama against SDPA."""
import pytest
import torch

from loraq.kernels.attention import GroupedAttention, causal_blocks, reference_attention


def _inputs(dtype, b=2, h=6, hkv=2, t=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda heads: torch.randn(b, heads, t, d, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def _packed_mask(b, t):
    # two examples per row: block-diagonal causal
    seg = torch.zeros(b, t, dtype=torch.long)
    seg[:, t // 3:] = 1
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return causal & (seg[:, :, None] == seg[:, None, :])


@pytest.mark.parametrize("kind", ["causal", "packed", "none"])
@pytest.mark.parametrize("block", [64, 7])
def test_forward_and_gradients_match_float64(kind, block):
    q, k, v = _inputs(torch.float32)
    b, _, t, d = q.shape
    mask = {"causal": torch.ones(t, t, dtype=torch.bool).tril(), "packed": _packed_mask(b, t), "none": None}[kind]
    blocks = causal_blocks(t, mask, kind != "none", block=block)
    assert len(blocks) == (1 if block > t or kind == "none" else 4)
    scale = d ** -0.5
    out = GroupedAttention.apply(q, k, v, mask, scale, blocks).transpose(1, 2)
    grad = torch.randn_like(out)
    out.backward(grad)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, None if mask is None else mask.reshape(-1, 1, t, t), False, scale)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5)


def test_bf16_close_to_float64():
    q, k, v = _inputs(torch.bfloat16, t=64, d=64)
    b, _, t, d = q.shape
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)
    out = GroupedAttention.apply(q, k, v, mask, d ** -0.5, causal_blocks(t, mask, True, block=16)).transpose(1, 2)
    ref = reference_attention(q.detach(), k.detach(), v.detach(), None, True, d ** -0.5)
    assert (out.float() - ref.float()).abs().max() < 3e-2


def test_under_autocast_the_backward_runs_as_the_forward_did():
    """Full fine-tuning keeps fp32 master weights and runs under bf16 autocast: Q and K can arrive in fp32
    (RoPE's fp32 cos/sin promote them) while the products run in bf16. The backward's products run under the
    same autocast; its gradients come back in each input's dtype, close to the float64 definition (it once
    stopped with "expected scalar type Float but found BFloat16")."""
    q, k, v = _inputs(torch.float32, t=32, d=32)
    t, d = q.shape[2], q.shape[3]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GroupedAttention.apply(q, k, v, mask, d ** -0.5, causal_blocks(t, mask, True, block=16))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.transpose(1, 2).backward(grad.transpose(1, 2).to(out.dtype))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, None, True, d ** -0.5)
    ref.backward(grad.transpose(1, 2).to(out.dtype).double())
    assert (out.transpose(1, 2).double() - ref).abs().max() < 3e-2
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert ours.grad.dtype == torch.float32
        assert (ours.grad.double() - theirs.grad).abs().max() < 0.05 * theirs.grad.abs().max()


def test_llama_with_loraq_attention_matches_sdpa(tiny_llama_dir):
    """Packed rows through a Llama: loraq's attention gives SDPA's logits and gradients."""
    from transformers import AutoModelForCausalLM

    from loraq.kernels.attention import register

    name = register()
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, attn_implementation=name)
    ids = torch.randint(3, ref.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(8), torch.arange(12)]).repeat(2, 1)  # two packed examples per row
    out_ref = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
    out = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    g_ref = ref.model.layers[0].self_attn.q_proj.weight.grad
    g = ours.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_blocks_only_where_nothing_above_the_diagonal_is_allowed():
    t = 12
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    assert causal_blocks(t, causal, True, block=4) == [(0, 4), (4, 8), (8, 12)]
    assert causal_blocks(t, None, True, block=5) == [(0, 4), (4, 8), (8, 12)]
    leaky = causal.clone()
    leaky[0, 5] = True  # one future key allowed: skipping would drop it
    assert causal_blocks(t, leaky, True, block=4) == [(0, t)]
    assert causal_blocks(t, None, False, block=4) == [(0, t)]
