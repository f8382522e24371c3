"""Model families as llama.cpp knows them: architecture, hyper-parameter keys and tensor names.

A Hugging Face ``model_type`` maps to a :class:`Family`: the GGUF
``general.architecture`` llama.cpp builds its graph from, the names of the
per-layer tensors (``model.layers.N.self_attn.q_proj.weight`` ->
``blk.N.attn_q.weight``), and whether the q/k rows must be re-ordered.

The rotary layout. Hugging Face's Llama rotates pairs ``(x_i, x_{i+d/2})`` of
each head (``rotate_half``); llama.cpp's ``llama`` graph (GGML "normal" rope)
rotates adjacent pairs ``(x_{2i}, x_{2i+1})``. So for that architecture the
rows of ``W_q`` and ``W_k`` (and their biases) are permuted per head::

    new[h, 2i]     = old[h, i]
    new[h, 2i + 1] = old[h, i + d/2]          i < d/2, d = head dim

which makes both graphs compute the same attention scores. Qwen2, Qwen3 and
Phi-3 use llama.cpp's NEOX rope, which is Hugging Face's layout: no
permutation. Mistral is the ``llama`` architecture in GGUF.

Keys are ``{arch}.context_length``, ``{arch}.embedding_length``, ... as ggml's
GGUF spec names them; 1-D tensors (norms, biases) are always stored in F32.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from gguf import GGUFValueType

from loraq.errors import ModelError


@dataclass(frozen=True)
class KV:
    """One GGUF metadata value with its type (arrays carry the type of their items)."""

    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


def u32(v: int) -> KV:
    return KV(int(v), GGUFValueType.UINT32)


def f32(v: float) -> KV:
    return KV(float(v), GGUFValueType.FLOAT32)


def string(v: str) -> KV:
    return KV(str(v), GGUFValueType.STRING)


def boolean(v: bool) -> KV:
    return KV(bool(v), GGUFValueType.BOOL)


def array(values: list, item_type: GGUFValueType) -> KV:
    return KV(list(values), GGUFValueType.ARRAY, item_type)


# per decoder layer: Hugging Face module path (under model.layers.N.) -> llama.cpp name (under blk.N.)
_LLAMA_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_QWEN3_BLOCK = {**_LLAMA_BLOCK, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_PHI3_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",  # q, k, v rows stacked, as llama.cpp's phi3 graph splits them
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",  # gate rows then up rows: llama.cpp's phi3 graph splits them
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model family is written for llama.cpp."""

    name: str
    arch: str
    block_names: Mapping[str, str]
    interleave_rotary_rows: bool = False
    extra_keys: Callable[[Any, str], dict[str, KV]] | None = field(default=None, compare=False)


def _phi3_keys(config: Any, arch: str) -> dict[str, KV]:
    keys = {}
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        keys[f"{arch}.rope.scaling.original_context_length"] = u32(original)
    if getattr(config, "sliding_window", None):
        keys[f"{arch}.attention.sliding_window"] = u32(config.sliding_window)
    return keys


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "llama", _LLAMA_BLOCK, interleave_rotary_rows=True),
    "mistral": Family("Mistral", "llama", _LLAMA_BLOCK, interleave_rotary_rows=True),
    "qwen2": Family("Qwen2", "qwen2", _LLAMA_BLOCK),
    "qwen3": Family("Qwen3", "qwen3", _QWEN3_BLOCK),
    "phi3": Family("Phi-3", "phi3", _PHI3_BLOCK, extra_keys=_phi3_keys),
}
ROPE_TYPES = ("default", "linear", "llama3")


def family_for(config: Any) -> Family:
    """The :class:`Family` of a transformers config; a ModelError naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        names = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
        raise ModelError(f"GGUF export does not support model_type {model_type!r}; supported families: {names}")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ModelError("GGUF export: this Qwen2 model uses sliding-window attention, which llama.cpp's qwen2 "
                         "graph does not implement; export a model with use_sliding_window false")
    return family


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict[str, Any]:
    """``{"rope_theta", "rope_type", ...}`` from a transformers 5 config (or older ``rope_theta``/``rope_scaling``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        raise ModelError("GGUF export: this model's rope settings are per layer type (rope_parameters has no "
                         "rope_theta), which loraq's GGUF export does not support")
    return params


def hyperparameters(config: Any, family: Family) -> dict[str, KV]:
    """The ``{arch}.*`` keys llama.cpp reads for this model."""
    a = family.arch
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = head_dim(config)
    rope = rope_parameters(config)
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    rotary_dim = int(dim * float(partial))
    keys = {
        f"{a}.context_length": u32(config.max_position_embeddings),
        f"{a}.embedding_length": u32(config.hidden_size),
        f"{a}.block_count": u32(config.num_hidden_layers),
        f"{a}.feed_forward_length": u32(config.intermediate_size),
        f"{a}.attention.head_count": u32(heads),
        f"{a}.attention.head_count_kv": u32(kv_heads),
        f"{a}.attention.layer_norm_rms_epsilon": f32(config.rms_norm_eps),
        f"{a}.rope.freq_base": f32(rope["rope_theta"]),
        f"{a}.rope.dimension_count": u32(rotary_dim),
        f"{a}.vocab_size": u32(config.vocab_size),
    }
    if dim * heads != config.hidden_size:
        keys[f"{a}.attention.key_length"] = u32(dim)
        keys[f"{a}.attention.value_length"] = u32(dim)
    keys.update(_rope_scaling_keys(rope, a))
    if family.extra_keys is not None:
        keys.update(family.extra_keys(config, a))
    return keys


def _rope_scaling_keys(rope: dict[str, Any], arch: str) -> dict[str, KV]:
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise ModelError(f"GGUF export: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if kind == "linear":
        return {f"{arch}.rope.scaling.type": string("linear"), f"{arch}.rope.scaling.factor": f32(rope["factor"])}
    return {}  # llama3: the per-frequency factors travel as the rope_freqs tensor (see extra_tensors)


def extra_tensors(config: Any) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the checkpoint does not hold: ``rope_freqs.weight`` for llama3 rope.

    llama.cpp divides each rotary frequency by ``rope_freqs[i]``; Hugging Face's
    llama3 rope divides the default frequencies by the same factors, so they
    are taken as ``inv_freq_default / inv_freq_llama3`` from transformers' own
    rope initialisers (float32).
    """
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = int(head_dim(config) * float(rope.get("partial_rotary_factor", 1.0)))
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return {"rope_freqs.weight": (plain / scaled.double()).float()}


def gguf_tensor_name(family: Family, hf_key: str) -> str:
    """llama.cpp's name for checkpoint key ``hf_key``; a ModelError for a tensor the family does not have."""
    module, _, leaf = hf_key.rpartition(".")
    if module in _TOP and leaf == "weight":
        return f"{_TOP[module]}.weight"
    match = _LAYER_KEY.match(hf_key)
    if match and match[2] in family.block_names:
        return f"blk.{match[1]}.{family.block_names[match[2]]}.{match[3]}"
    raise ModelError(f"GGUF export: tensor {hf_key} has no llama.cpp counterpart in the {family.name} "
                     f"({family.arch}) architecture; this variant of the model is not supported")


def interleave_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k weight (``[n_heads * d, in]``) or bias (``[n_heads * d]``): HF's -> llama.cpp's rotary layout."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ModelError(f"GGUF export: a q/k projection with {rows} rows does not split into {n_heads} heads of pairs")
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def prepare_tensor(family: Family, config: Any, gguf_name: str, w: torch.Tensor) -> torch.Tensor:
    """A float32 tensor as llama.cpp wants it under ``gguf_name`` (q/k rows re-ordered for the llama graph)."""
    w = w.float()
    if family.interleave_rotary_rows:
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
        if kind == "attn_q":
            w = interleave_rotary_rows(w, config.num_attention_heads)
        elif kind == "attn_k":
            w = interleave_rotary_rows(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return w


def block_index(gguf_name: str) -> int | None:
    """N of ``blk.N.*``, else None."""
    if gguf_name.startswith("blk."):
        return int(gguf_name.split(".")[1])
    return None
