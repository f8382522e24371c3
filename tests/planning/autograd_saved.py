"""The reference the planner's activation terms are held to: what autograd really keeps, on real tensors."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def kept_storages(model: nn.Module) -> Iterator[dict[int, int]]:
    """``{storage address: bytes}`` of every tensor autograd saves inside the block, each storage once, the
    model's own weights (and 4-bit quant states) left out."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None:
            weights |= {t.untyped_storage().data_ptr() for t in state.tensors().values()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept
