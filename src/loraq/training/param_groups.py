"""The optimizer's parameter groups: which trainable parameter learns at which rate, with which weight decay.

With ``lr`` = ``--lr``, ``ratio`` = ``--loraplus-lr-ratio`` and ``lr_e`` =
``--embedding-lr`` (default ``lr``):

| parameters | learning rate |
|---|---|
| LoRA's ``A`` | ``lr`` |
| LoRA's ``B`` (LoRA+, Hayou et al. 2024: ``eta_B = ratio * eta_A``) | ``lr * ratio`` |
| a DoRA magnitude ``m`` (a 1-D adapter parameter: PEFT's ``create_loraplus_optimizer`` groups it so) | ``lr * ratio`` |
| modules trained in full beside LoRA (``--modules-to-save``) | ``lr_e`` |
| ``--method full``: the input and output embeddings | ``lr_e`` |
| ``--method full``: everything else | ``lr`` |

Weight decay (``--weight-decay``) applies to parameters of two or more
dimensions only, never to biases, norms or magnitudes. With ratio 1 and no
``--embedding-lr`` this is plain AdamW at one rate. Groups are ordered by
their first parameter's place in the model, so a resumed run lines its
checkpoint's groups up with its own.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def parameter_rates(model: nn.Module, lr: float, loraplus_lr_ratio: float = 1.0,
                    embedding_lr: float | None = None) -> dict[int, float]:
    """``id(parameter) -> learning rate`` for every trainable parameter (see the module docstring)."""
    from loraq.lora.model import lora_layers, saved_modules

    rate_b = lr * loraplus_lr_ratio
    rate_e = lr if embedding_lr is None else embedding_lr
    rates: dict[int, float] = {}
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            rates[id(layer.lora_A[name].weight)] = lr
            rates[id(layer.lora_B[name].weight)] = rate_b
            if layer.is_dora(name):
                rates[id(layer.lora_magnitude_vector[name])] = rate_b
    for _, wrapper in saved_modules(model):
        for p in wrapper.modules_to_save.parameters():
            rates[id(p)] = rate_e
    if not rates:  # --method full: every weight trains; the embeddings at their own rate
        for module in (_get(model, "get_input_embeddings"), _get(model, "get_output_embeddings")):
            for p in (module.parameters() if module is not None else ()):
                rates[id(p)] = rate_e
    return {id(p): rates.get(id(p), lr) for p in model.parameters() if p.requires_grad}


def _get(model: nn.Module, getter: str) -> nn.Module | None:
    fn = getattr(model, getter, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def param_groups(model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float = 1.0,
                 embedding_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: one per (rate, decays), in the order the parameters first appear; empty ones left out."""
    rates = parameter_rates(model, lr, loraplus_lr_ratio, embedding_lr)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in rates or id(p) in seen:
            continue
        seen.add(id(p))
        groups.setdefault((rates[id(p)], p.ndim >= 2), []).append(p)
    return [{"params": params, "lr": rate, "weight_decay": weight_decay if decays else 0.0}
            for (rate, decays), params in groups.items()]
