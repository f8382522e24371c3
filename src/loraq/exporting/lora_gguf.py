"""An adapter alone as a llama.cpp LoRA file (``--lora adapter.gguf`` on top of the base model's GGUF).

llama.cpp's LoRA GGUF: ``general.type = "adapter"``, ``adapter.type = "lora"``,
``general.architecture`` equal to the base model's, and for each adapted
weight ``W`` (by its llama.cpp name, e.g. ``blk.0.attn_q.weight``) the pair
``W.lora_a`` (``[r, in]``) and ``W.lora_b`` (``[out, r]``); llama.cpp adds
``scale * B (A x)`` to ``W x``, with ``scale = user_scale * alpha / r`` when
``adapter.lora.alpha`` is non-zero and ``user_scale`` otherwise.

loraq folds each adapter's own scaling ``s = alpha / r`` (or ``alpha /
sqrt(r)``, per-layer ranks and alphas included) into ``B`` and writes
``adapter.lora.alpha = 0``, so every layer is exact whatever its rank. The
file's factors are written as they are: the update PEFT would apply to the
original weights, which is what the base GGUF holds. For the ``llama``
architecture the rows of ``B`` for q/k are re-ordered as the base weight's
rows are (:func:`loraq.exporting.gguf_arch.interleave_rotary_rows`); ``A`` acts
on the input and keeps its layout.

A GGUF LoRA cannot carry fully trained modules (``modules_to_save``): such an
adapter is refused with a pointer to the merged export.
"""
from __future__ import annotations

from typing import Any

from gguf import GGMLQuantizationType as T

from loraq.errors import AdapterError
from loraq.exporting.adapter_files import AdapterUpdates
from loraq.exporting.gguf import PlannedTensor
from loraq.exporting.gguf_arch import KV, Family, f32, gguf_tensor_name, prepare_tensor, string


def lora_plan(updates: AdapterUpdates, family: Family, config: Any) -> list[PlannedTensor]:
    """``W.lora_a`` / ``W.lora_b`` for every adapted linear of the adapter's files."""
    if updates.replaced:
        modules = sorted({key.rsplit(".", 1)[0] for key in updates.replaced})
        raise AdapterError(f"--format gguf-lora: a llama.cpp LoRA file cannot carry fully trained modules "
                           f"(modules_to_save: {', '.join(modules)}); export the merged model with --format gguf")
    plan: list[PlannedTensor] = []
    for module, pair in sorted(updates.pairs.items()):
        base = gguf_tensor_name(family, f"{module}.weight")
        plan.append(PlannedTensor(f"{base}.lora_a", tuple(pair.a.shape), T.F32, lambda a=pair.a: a))
        plan.append(PlannedTensor(f"{base}.lora_b", tuple(pair.b.shape), T.F32,
                                  lambda p=pair, base=base: prepare_tensor(family, config, base, p.b * p.scaling)))
    if not plan:
        raise AdapterError("--format gguf-lora: the adapter has no LoRA layers to write")
    return plan


def lora_metadata(name: str) -> dict[str, KV]:
    return {
        "general.type": string("adapter"),
        "general.name": string(name),
        "adapter.type": string("lora"),
        "adapter.lora.alpha": f32(0.0),  # the scaling is folded into lora_b (see the module docstring)
    }
