"""An adapter alone as a llama.cpp LoRA file (``--lora adapter.gguf`` on top of the base model's GGUF).

llama.cpp's LoRA GGUF: ``general.type = "adapter"``, ``adapter.type = "lora"``,
``general.architecture`` equal to the base model's, and for each adapted
weight ``W`` (by its llama.cpp name, e.g. ``blk.0.attn_q.weight``) the pair
``W.lora_a`` (``[r, in]``) and ``W.lora_b`` (``[out, r]``); llama.cpp adds
``scale * B (A x)`` to ``W x``, with ``scale = user_scale * alpha / r`` when
``adapter.lora.alpha`` is non-zero and ``user_scale`` otherwise.

loraq folds each adapter's own scaling ``s = alpha / r`` (or ``alpha /
sqrt(r)``, per-layer ranks and alphas included) into ``B`` and writes
``adapter.lora.alpha = 0``, so every layer is exact whatever its rank. Several
active adapters on one layer are stacked along ``r`` (``[A_1; A_2]``,
``[s_1 B_1, s_2 B_2]``), which adds their updates. For the ``llama``
architecture the rows of ``B`` for q/k are re-ordered as the base weight's
rows are (:func:`loraq.exporting.gguf_arch.interleave_rotary_rows`); ``A`` acts
on the input and keeps its layout.

A GGUF LoRA cannot carry fully trained modules (``modules_to_save``): such an
adapter is refused with a pointer to the merged export.
"""
from __future__ import annotations

from typing import Any

import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from loraq.errors import AdapterError
from loraq.exporting.gguf import PlannedTensor
from loraq.exporting.gguf_arch import KV, Family, f32, gguf_tensor_name, prepare_tensor, string


def lora_plan(model: nn.Module, family: Family, config: Any) -> list[PlannedTensor]:
    """``W.lora_a`` / ``W.lora_b`` for every LoRA layer of ``model`` (active adapters, unmerged)."""
    from loraq.lora.layer import LoraLinear, ModulesToSave

    saved = [name for name, m in model.named_modules() if isinstance(m, ModulesToSave)]
    if saved:
        raise AdapterError(f"--format gguf-lora: a llama.cpp LoRA file cannot carry fully trained modules "
                           f"(modules_to_save: {', '.join(saved)}); export the merged model with --format gguf")
    plan: list[PlannedTensor] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear):
            continue
        active = [a for a in layer.active_adapters if a not in layer.merged_adapters]
        if not active:
            continue
        base = gguf_tensor_name(family, f"{name}.weight")
        a = torch.cat([layer.lora_A[n].weight.detach().float() for n in active])
        b = torch.cat([layer.lora_B[n].weight.detach().float() * layer.scaling[n] for n in active], dim=1)
        plan.append(PlannedTensor(f"{base}.lora_a", tuple(a.shape), T.F32, lambda a=a: a))
        plan.append(PlannedTensor(f"{base}.lora_b", tuple(b.shape), T.F32,
                                  lambda b=b, base=base: prepare_tensor(family, config, base, b)))
    if not plan:
        raise AdapterError("--format gguf-lora: the model has no active LoRA layers to write")
    return plan


def lora_metadata(name: str) -> dict[str, KV]:
    return {
        "general.type": string("adapter"),
        "general.name": string(name),
        "adapter.type": string("lora"),
        "adapter.lora.alpha": f32(0.0),  # the scaling is folded into lora_b (see the module docstring)
    }
