"""Each family with loraq's fast paths applied computes its own forward and gradients.

The reference is the family's own transformers model, an untouched copy of the same weights: logits and
every parameter's gradient (fp32) agree; the report names what is swapped in and why the rest is not.
The backward formulas run eagerly here (``LORAQ_COMPILE=0``): their generated versions are held to them in
``test_norm_gate.py``, and generating them again for fifteen families' shapes would cost CI a minute.
"""
from __future__ import annotations

import copy

import pytest
import torch

from family_configs import FAMILIES, family_config
from loraq.kernels import apply_fast_paths

GATED_RMS = {"RMSNorm", "gate"}
# what each family's report should say is on (besides the attention, named in ATTENTION_OFF when it is not)
EXPECTED = {
    "llama": GATED_RMS, "qwen2": GATED_RMS, "qwen3": GATED_RMS, "mistral": GATED_RMS, "gemma2": GATED_RMS,
    "gemma3": GATED_RMS, "phi3": GATED_RMS, "olmo2": GATED_RMS, "granite": GATED_RMS, "stablelm": {"gate"},
    "phi": set(), "starcoder2": set(), "opt": set(), "gpt_neox": set(), "gpt2": set(),
}
ATTENTION_OFF = {"gemma2": "softcapped logits", "gpt2": "dropout 0.1"}


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    monkeypatch.setenv("LORAQ_COMPILE", "0")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_paths_give_the_family_s_own_logits_and_gradients(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(family_config(family, 96)).eval()
    with torch.no_grad():  # Gemma's norms start at zero offset: move every weight off its initial value
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = copy.deepcopy(reference)
    report = apply_fast_paths(ours)
    kinds = {kind for kind in ("RMSNorm", "gate") if any(kind in k for k in report.active)}
    assert kinds == EXPECTED[family], report.line()
    assert (report.attention is None) == (family not in ATTENTION_OFF), report.line()
    if family in ATTENTION_OFF:
        assert ATTENTION_OFF[family] in report.attention
    # eval mode (no dropout) with gradients on: the training-time paths, deterministic
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    expected, got = reference(input_ids=ids).logits, ours(input_ids=ids).logits
    assert _rel(got.detach(), expected.detach()) < 1e-5
    expected.square().mean().backward()
    got.square().mean().backward()
    scale = max(float(p.grad.norm()) for p in reference.parameters() if p.grad is not None)
    for (name, p), (_, q) in zip(reference.named_parameters(), ours.named_parameters()):
        if p.grad is not None:  # (a key bias's gradient is zero up to rounding: measured against the largest)
            assert float((q.grad - p.grad).norm()) <= 1e-4 * max(float(p.grad.norm()), 1e-4 * scale), name


def test_the_report_line_names_active_paths_and_reasons():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(family_config("gpt2", 96))
    line = apply_fast_paths(model).line()
    assert line.startswith("fast paths: none; generic: ")
    assert "attention (dropout 0.1: SDPA)" in line and "LayerNorm (no lean path)" in line
    assert "GPT2MLP (not a gated MLP)" in line
