"""An adapter's files as per-tensor updates: the merge streamed from the base's files, and the GGUF LoRA.

Applied as PEFT applies the file to the original weights, for each adapted
linear ``N`` (``A`` ``[r, in]``, ``B`` ``[out, r]``, ``s = alpha / r`` or
``alpha / sqrt(r)`` with the file's per-module rank and alpha)::

    N.weight  ->  W0 + s B A          (float32)

and each tensor of a fully trained module (``modules_to_save``) replaces the
base's. The adapter is checked against the base's architecture built without
weights (``torch.device("meta")``) -- every key present, every shape right --
so an adapter that does not fit fails before anything is read or written,
and the base's weights never sit in memory together: each is read, updated
and written on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraq.exporting.tensors import LazyTensor

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear: its module name, ``A``, ``B`` (float32) and scaling ``s``."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return (self.b @ self.a) * self.scaling


@dataclass(frozen=True)
class AdapterUpdates:
    pairs: dict[str, LoraPair]  # module name -> its pair
    replaced: dict[str, torch.Tensor]  # state key (modules_to_save) -> the trained tensor


def read_updates(skeleton: torch.nn.Module, adapter: str | Path, allow_pickle: bool = False) -> AdapterUpdates:
    """The adapter's updates, checked to fit ``skeleton`` (the base on the meta device); an AdapterError otherwise."""
    from loraq.lora.config import scaling
    from loraq.lora.files import checked_adapter
    from loraq.lora.model import PEFT_PREFIX

    config, tensors = checked_adapter(skeleton, adapter, allow_pickle=allow_pickle)
    pairs, replaced = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(LORA_A):
            module = name.removesuffix(LORA_A)
            s = scaling(config.alpha_for(module), config.rank_for(module), config.use_rslora)
            pairs[module] = LoraPair(module, tensor.float(), tensors[key.replace(LORA_A, LORA_B)].float(), s)
        elif not name.endswith(LORA_B):
            replaced[name] = tensor
    return AdapterUpdates(pairs, replaced)


def with_updates(tensors: list[LazyTensor], updates: AdapterUpdates, config: Any) -> list[LazyTensor]:
    """The base's tensor stream with the adapter merged into each tensor it touches, when that tensor is loaded."""
    by_name = {t.name: t for t in tensors}
    out = []
    for t in tensors:
        pair = updates.pairs.get(t.name.removesuffix(".weight")) if t.name.endswith(".weight") else None
        if t.name in updates.replaced:
            out.append(LazyTensor(t.name, t.shape, lambda v=updates.replaced[t.name]: v))
        elif pair is not None:
            out.append(LazyTensor(t.name, t.shape, lambda t=t, p=pair: t.load().float() + p.delta()))
        else:
            out.append(t)
    return out + _untied_head(by_name, updates, config)


def _untied_head(by_name: dict[str, LazyTensor], updates: AdapterUpdates, config: Any) -> list[LazyTensor]:
    """A tied head whose embedding or head the adapter changes is written on its own (as the adapted model has it)."""
    embedding = by_name.get("model.embed_tokens.weight")
    if not getattr(config, "tie_word_embeddings", False) or "lm_head.weight" in by_name or embedding is None:
        return []
    if "lm_head.weight" in updates.replaced:
        return [LazyTensor("lm_head.weight", embedding.shape, lambda: updates.replaced["lm_head.weight"])]
    if "lm_head" in updates.pairs:
        pair = updates.pairs["lm_head"]
        return [LazyTensor("lm_head.weight", embedding.shape, lambda: embedding.load().float() + pair.delta())]
    if "model.embed_tokens.weight" in updates.replaced:  # the head keeps the original embedding
        return [LazyTensor("lm_head.weight", embedding.shape, embedding.load)]
    return []
