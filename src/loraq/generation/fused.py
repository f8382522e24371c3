"""The lean decode step's blocks as one native call (:mod:`loraq.kernels.block`), where every block allows it.

A decode step (one new token per row; rows in groups of at most ``SMALL_BATCH_ROWS``, one C call each) runs
every decoder block in C when each of its seven linear layers is one of: a loraq 4-bit layer (its product in
float32), a float32 ``nn.Linear``, or a LoRA layer over one of those with no adapter live (disabled, merged,
none active), exactly one live, plain LoRA adapter (no DoRA, no dropout in training mode), or rows routed to
adapters by one :class:`loraq.lora.rows.RowAdapters` in its stacked form (each row's columns of the stacks,
weighted as the routing's coefficients say); its activation SiLU. The step computes in float32 whatever the
model's dtype: a bf16 model's activations are widened on the way in and rounded on the way out, its norms and
biases copied to float32, its KV cache read and written as bf16 (4-bit products and LoRA updates in float32,
where the module-by-module step rounds each to bf16). Anything else -- a second live adapter, DoRA, the
routing's segment form, a bf16 ``nn.Linear`` base -- and the step runs module by module
(:class:`loraq.generation.lean.LeanDecoder`), which is also the reference the tests hold this one to.

The plan (the C structs pointing at each layer's weights and LoRA factors) is made on the first step and
remade when any layer's state changes: the adapters active, disabled or merged, a routing entered or laid out
anew (adapters loaded or unloaded), a factor written (its tensor version), a base replaced. Which rows use which
adapters is read from the routing on every step. ``LORAQ_FUSED_DECODE=0`` switches this path off.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from loraq.kernels.block import LINEARS, Block, Linear, Step, decode_blocks, library
from loraq.lora.layer import LoraLinear, is_4bit
from loraq.quant.functional import SMALL_BATCH_ROWS

_MODULES = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
            "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
            "down": ("mlp", "down_proj")}
_PATHS = [_MODULES[n] for n in LINEARS]
_DTYPES = (torch.float32, torch.bfloat16)  # of the activations, norms, biases and cache; products run in float32


def enabled() -> bool:
    return os.environ.get("LORAQ_FUSED_DECODE", "1").lower() not in {"0", "false", "no", "off"}


class FusedBlocks:
    """``run(x, cos, sin, mask, cache)``: every block of ``inner`` (a Llama-shaped ``model.model``) on ``x [rows,
    1, hidden]`` in place, True; or False, untouched, where this path does not apply (module docstring)."""

    def __init__(self, inner: nn.Module, heads: int, kv_heads: int, head_dim: int, scaling: float):
        self.inner, self.lib = inner, library()
        self.shape = (heads, kv_heads, head_dim, float(scaling))
        self.watch: Watch | None = None  # what the plan was made from
        self.blocks: ctypes.Array | None = None
        self.keep: list = []
        self.routing = None  # the RowAdapters every layer's rows are routed by, if any

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache) -> bool:
        rows = x.shape[0]
        if self.lib is None or x.dtype not in _DTYPES or rows == 0 or x.shape[1] != 1:
            return False
        if mask.shape[1] != cache.filled + 1 or cache.keys[0].dtype not in _DTYPES:
            return False
        # looked up each step: adapters injected since (a server loading one) replace the modules
        modules = _linears(self.inner)
        if self.watch is None or not self.watch.unchanged(modules):
            self.watch, self.blocks = Watch(modules), self._plan(modules)
        if self.blocks is None:
            return False
        coef = self.routing.coefficients(x).reshape(rows, -1).contiguous() if self.routing is not None else None
        if coef is not None and coef.shape[0] != rows:
            return False
        mask, h = mask.contiguous(), x.float().contiguous()  # bf16 models: the step in float32, rounded at its end
        cos, sin = cos.reshape(rows, -1).float().contiguous(), sin.reshape(rows, -1).float().contiguous()
        heads, kv_heads, head_dim, scaling = self.shape
        chunks = -(-rows // SMALL_BATCH_ROWS)  # the kernel's products take up to 16 rows a pass
        for i in range(chunks):
            r0, r1 = rows * i // chunks, rows * (i + 1) // chunks
            for block, keys, values in zip(self.blocks, cache.keys, cache.values):
                block.keys, block.values = keys[r0].data_ptr(), values[r0].data_ptr()
            step = Step(r1 - r0, x.shape[-1], heads, kv_heads, head_dim, self.inter, cache.keys[0].shape[2],
                        cache.filled, mask.shape[1], self.max_rank, cache.keys[0].dtype == torch.bfloat16,
                        cos[r0].data_ptr(), sin[r0].data_ptr(),
                        mask[r0].data_ptr(), None if coef is None else coef[r0].data_ptr(),
                        0 if coef is None else coef.shape[1], scaling, 1)
            decode_blocks(self.lib, self.blocks, step, h[r0:r1])
        if h is not x:
            x.copy_(h)
        return True

    def _plan(self, linears: list[list[nn.Module]]) -> ctypes.Array | None:
        """The C blocks, or None where a block cannot run natively; ``keep`` holds what their pointers point to."""
        self.keep = []
        self.max_rank, self.inter = 1, 0
        routings = {id(m.row_adapters): m.row_adapters for layer in linears for m in layer
                    if isinstance(m, LoraLinear) and m.row_adapters is not None}
        if len(routings) > 1:
            return None
        self.routing = next(iter(routings.values()), None)
        blocks = (Block * len(linears))()
        for into, block, modules in zip(blocks, self.inner.layers, linears):
            if not _plain_block(block):
                return None
            for name, module in zip(LINEARS, modules):
                made = _linear(module, self.keep)
                if made is None:
                    return None
                setattr(into, name, made)
                self.max_rank = max(self.max_rank, made.rank)
            self.inter = modules[LINEARS.index("gate")].out_features
            for side, norm in (("1", block.input_layernorm), ("2", block.post_attention_layernorm)):
                setattr(into, "norm" + side, _pointer(norm.weight, self.keep))
                setattr(into, "eps" + side, float(norm.variance_epsilon))
        return blocks


def _linears(inner: nn.Module) -> list[list[nn.Module]]:
    """Each block's seven linear layers, in LINEARS' order (read from the module tables: this runs every step)."""
    return [[b._modules[part]._modules[attribute] for part, attribute in _PATHS] for b in
            inner._modules["layers"]._modules.values()]


def _plain_block(block: nn.Module) -> bool:
    """Float32 or bf16 norms and a SiLU MLP (the rest :func:`loraq.generation.lean.supports` checked)."""
    norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
    act = type(getattr(block.mlp, "act_fn", None)).__name__
    return all(w.dtype in _DTYPES and w.is_cpu for w in norms) and act in ("SiLU", "SiLUActivation")


def _live(d: dict) -> list[str]:
    """The adapters a LoRA layer (its ``__dict__``) applies unmerged: none while disabled."""
    return [] if d["disabled"] else [a for a in d["active_adapters"] if a not in d["merged_adapters"]]


class Watch:
    """What a plan depends on in the layers it was made from, cheap to compare on every step (attribute lookups
    through ``nn.Module.__getattr__`` would cost ~7 ms a step for a 30-block model; this ~0.3 ms): the layers
    themselves, each LoRA layer's adapters active / merged / disabled, routing (and its layout), mode and base,
    and the version and storage of every live factor."""

    def __init__(self, modules: list[list[nn.Module]]):
        self.modules = [m for layer in modules for m in layer]
        self.loras = [(d, list(d["active_adapters"]), list(d["merged_adapters"]), d["disabled"], d["row_adapters"],
                       d["training"], d["_modules"]["base"])
                      for d in (m.__dict__ for m in self.modules) if "lora_A" in d["_modules"]]
        self.routings = {id(r): (r, r.layout_version, r.stacked) for *_, r, _, _ in self.loras if r is not None}
        self.factors = [(w, w._version, w.data_ptr()) for d, *_ in self.loras for w in _live_factors(d)]

    def unchanged(self, modules: list[list[nn.Module]]) -> bool:
        flat = [m for layer in modules for m in layer]
        if len(flat) != len(self.modules) or any(a is not b for a, b in zip(flat, self.modules)):
            return False
        for d, active, merged, disabled, routing, training, base in self.loras:
            if (d["active_adapters"] != active or d["merged_adapters"] != merged or d["disabled"] != disabled
                    or d["row_adapters"] is not routing or d["training"] != training
                    or d["_modules"]["base"] is not base):
                return False
        if any(r.layout_version != layout or r.stacked != stacked for r, layout, stacked in self.routings.values()):
            return False
        return all(w._version == version and w.data_ptr() == pointer for w, version, pointer in self.factors)


def _live_factors(d: dict) -> list[torch.Tensor]:
    """The A and B weights of a LoRA layer's live adapters (its ``__dict__``)."""
    return [d["_modules"][side]._modules[a]._parameters["weight"] for a in _live(d) for side in ("lora_A", "lora_B")]


def _linear(module: nn.Module, keep: list) -> Linear | None:
    """The C ``linear`` of ``module``, or None where it is not one this path computes."""
    a = sbt = None
    if isinstance(module, LoraLinear) and module.row_adapters is not None:
        return _routed(module, keep)
    if isinstance(module, LoraLinear):
        live = _live(module.__dict__)
        if len(live) > 1:
            return None
        if live:
            name = live[0]
            if module.is_dora(name) or (module.training and name in module.lora_dropout):
                return None
            a, sbt = module.inference_factors(name, torch.float32)
        module = module.base
    made = _base(module, keep)
    if made is not None and a is not None:
        keep.extend((a, sbt))
        made.lora_a, made.lora_bt, made.rank = a.data_ptr(), sbt.data_ptr(), a.shape[0]
    return made


def _routed(layer: LoraLinear, keep: list) -> Linear | None:
    """The base with the routing's stacks ``A_stack [S R, in]`` and ``B_stack^T [S R, out]`` (each row picks its
    columns through the step's coefficients)."""
    routing = layer.row_adapters
    made = _base(layer.base, keep) if routing.stacked else None
    if made is not None and routing.slots:
        a, b = routing.stack(layer, torch.float32)
        bt = b.t().contiguous()
        keep.extend((a, bt))
        made.stack_a, made.stack_bt, made.stack_cols = a.data_ptr(), bt.data_ptr(), a.shape[0]
    return made


def _base(module: nn.Module, keep: list) -> Linear | None:
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.dtype not in _DTYPES or not bias.is_cpu):
        return None
    if is_4bit(module):
        from loraq.kernels.gemv4 import weight_arguments

        state = module.quant_state
        if module.compute_dtype not in _DTYPES or not module.weight.is_cpu or state.code.numel() != 16:
            return None
        arguments = weight_arguments(module.weight, state)
        keep.append(arguments)
        return Linear(w4=arguments.address, bias=_pointer(bias, keep), n_out=state.shape[0], n_in=state.shape[1])
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.is_cpu:
        return Linear(dense=_pointer(module.weight, keep), bias=_pointer(bias, keep), n_out=module.out_features,
                      n_in=module.in_features)
    return None


def _pointer(t: torch.Tensor | None, keep: list) -> int | None:
    """A float32 contiguous copy's (or the tensor's own, where it is one) address, kept alive in ``keep``."""
    if t is None:
        return None
    t = t.detach().float().contiguous()
    keep.append(t)
    return t.data_ptr()
