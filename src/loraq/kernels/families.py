"""Which fast path each model family's modules take for training, and why the others do not.

* Matmul attention (:mod:`loraq.kernels.attention`): any model whose attention
  goes through transformers' attention interface with SDPA (every family in
  the README's table). It hands a call back to SDPA when the call is not its
  math: softcapped logits (Gemma2), attention dropout (GPT-2's default 0.1),
  sequences too long for its saved probabilities, devices other than the CPU.
* Lean RMSNorm (:class:`~loraq.kernels.norm_gate.RMSNormFunction`) and lean
  gated activation (:class:`~loraq.kernels.norm_gate.GatedActFunction`): only
  modules of the classes below, each listed after its forward was read and
  found to be exactly one of the forms in :mod:`loraq.kernels.norm_gate`; a
  test (``tests/kernels/test_families.py``) holds each patched family to its
  own forward and gradients. A class not listed keeps its own forward.

LayerNorm families (Phi, StableLM, Starcoder2, OPT, GPT-NeoX, GPT-2) and
ungated MLPs (``fc1 -> act -> fc2``) have no lean path: autograd's own kernels
run there.
"""
from __future__ import annotations

import functools
import types
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from loraq.kernels.norm_gate import GatedActFunction, RMSNormFunction

_LLAMA_FORM = "cast_then_scale"
RMSNORM_CLASSES = {
    "LlamaRMSNorm": _LLAMA_FORM, "MistralRMSNorm": _LLAMA_FORM, "Qwen2RMSNorm": _LLAMA_FORM,
    "Qwen3RMSNorm": _LLAMA_FORM, "Phi3RMSNorm": _LLAMA_FORM, "GraniteRMSNorm": _LLAMA_FORM,
    "Olmo2RMSNorm": "scale_then_cast",
    "Gemma2RMSNorm": "offset_scale", "Gemma3RMSNorm": "offset_scale",
}
# gate and up as two projections, ``down(act(gate(x)) * up(x))``; Phi-3 fuses them: ``gate, up = gate_up(x).chunk(2)``
GATED_MLP_CLASSES = {
    "LlamaMLP": "separate", "MistralMLP": "separate", "Qwen2MLP": "separate", "Qwen3MLP": "separate",
    "GraniteMLP": "separate", "Olmo2MLP": "separate", "StableLmMLP": "separate", "Gemma2MLP": "separate",
    "Gemma3MLP": "separate", "Phi3MLP": "fused",
}
ACTIVATION_NAMES = {"silu": "SiLU", "gelu_tanh": "GeLU-tanh"}


@dataclass
class FastPaths:
    """What :func:`apply_fast_paths` did: ``active`` path -> count per module class; ``generic``: why not."""

    attention: str | None = None  # the reason attention stays with its own implementation, None when swapped
    active: Counter = field(default_factory=Counter)
    generic: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """One line for ``loraq train``: the fast paths on, and what runs generic code and why."""
        on = (["matmul attention"] if self.attention is None else []) + [f"{k} x{n}" for k, n in self.active.items()]
        off = ([f"attention ({self.attention})"] if self.attention is not None else []) + \
            [f"{k} ({why})" for k, why in self.generic.items()]
        return f"fast paths: {', '.join(on) or 'none'}" + (f"; generic: {', '.join(off)}" if off else "")


def gate_activation(module: nn.Module) -> str | None:
    """``silu`` or ``gelu_tanh`` when the module's activation is exactly that PyTorch op, else None."""
    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    inner = getattr(act, "act", None)
    if name == "GELUTanh" and isinstance(inner, functools.partial) and inner.keywords.get("approximate") == "tanh":
        return "gelu_tanh"
    return None


def apply_norm_gate_modules(model: nn.Module, report: FastPaths | None = None) -> int:
    """Swap the lean forwards into the allowlisted modules; returns how many (``report`` filled in if given)."""
    report = report if report is not None else FastPaths()
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name in RMSNORM_CLASSES and hasattr(module, "weight"):
            _patch_rmsnorm(module, RMSNORM_CLASSES[name])
            report.active[f"RMSNorm ({name})"] += 1
        elif name in GATED_MLP_CLASSES and gate_activation(module) is not None:
            activation = gate_activation(module)
            _patch_gated_mlp(module, activation, GATED_MLP_CLASSES[name] == "fused")
            report.active[f"{ACTIVATION_NAMES[activation]} gate ({name})"] += 1
        else:
            reason = _why_generic(module, name)
            if reason is not None:
                report.generic.setdefault(name, reason)
            continue
        count += 1
    return count


def _why_generic(module: nn.Module, name: str) -> str | None:
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return "no lean path"
    if name.endswith("RMSNorm"):
        return "a form not checked against the lean path"
    if name in GATED_MLP_CLASSES:
        act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
        return f"activation {type(act).__name__} has no lean gate"
    if name.endswith("MLP"):
        return "not a gated MLP" if not hasattr(module, "gate_proj") else "not checked against the lean path"
    return None


def _patch_rmsnorm(module: nn.Module, form: str) -> None:
    eps_attr = "variance_epsilon" if hasattr(module, "variance_epsilon") else "eps"

    def forward(self, hidden_states):
        return RMSNormFunction.apply(hidden_states, self.weight, getattr(self, eps_attr), form)

    module.forward = types.MethodType(forward, module)


def _patch_gated_mlp(module: nn.Module, activation: str, fused: bool) -> None:
    if fused:
        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(GatedActFunction.apply(gate, up, activation))
    else:
        def forward(self, x):
            return self.down_proj(GatedActFunction.apply(self.gate_proj(x), self.up_proj(x), activation))
    module.forward = types.MethodType(forward, module)


def attention_fallback(model: nn.Module, device=None) -> str | None:
    """Why every attention call of this model would go to SDPA anyway (None: the matmul path can take them)."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None):
        return "softcapped logits: the model's own attention"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"implementation {implementation!r}, not sdpa"
    if not model._can_set_attn_implementation():
        return "the model cannot switch its attention implementation"
    dropout = max(float(getattr(config, key, 0.0) or 0.0)
                  for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"))
    if dropout > 0:
        return f"dropout {dropout:g}: SDPA"
    device = device if device is not None else next(model.parameters()).device
    if device.type != "cpu":
        return f"on {device.type}: SDPA (the matmul path is for the CPU)"
    return None
