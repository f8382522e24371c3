"""Finding parts of a model that more than one layer of loraq needs: the output head.

A model's output head is what ``get_output_embeddings()`` returns (its real
name differs by family: ``lm_head``, ``embed_out``, ``output``, ...), else a
top-level ``lm_head``. A wrapper that stands in for the head -- a module whose
``base`` or ``original_module`` is the head, as loraq's LoRA and
modules-to-save wrappers are -- carries the head's name.
"""
from __future__ import annotations

from torch import nn


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            return head
    return getattr(model, "lm_head", None)


def output_head_name(model: nn.Module) -> str | None:
    """The module name of the output head (or of the wrapper around it), or None."""
    head = output_head(model)
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
        if getattr(module, "base", None) is head or getattr(module, "original_module", None) is head:
            return name
    return None
