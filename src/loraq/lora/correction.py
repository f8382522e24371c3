"""The frozen correction of a 4-bit base, stored beside an adapter: ``base_correction.safetensors``.

``--init calibrated`` fits ``s B0 A0 ~ W - q(W)`` per layer and trains the
adapter beside it with the pair frozen (:mod:`loraq.lora.init`): the model
trained is ``q(W) + s B0 A0 + s B A``. The adapter folder keeps PEFT's files
for ``B, A`` -- an ordinary adapter of the full-precision weights, since
``q(W) + s B0 A0 ~ W`` -- and this file for the trained 4-bit base::

    base_model.model.<layer>.correction_A   [r0, in]    A0
    base_model.model.<layer>.correction_B   [out, r0]   s B0 (the scale folded in)

float32 (the values the layer used, rounded to its compute dtype), with metadata
``{"format": "loraq-base-correction", "version": "1"}``.
PEFT never reads it; :mod:`loraq.lora.adapted` applies it when an adapter goes
on the base it was trained on, and leaves it out on the full-precision one.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from loraq.errors import AdapterError
from loraq.lora.model import PEFT_PREFIX, lora_layers

CORRECTION_NAME = "base_correction.safetensors"
FORMAT = "loraq-base-correction"


def correction_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The file's tensors for the layers whose adapter ``adapter_name`` has a correction (empty: none)."""
    tensors = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_correction:
            c = layer.lora_correction[adapter_name]
            tensors[f"{PEFT_PREFIX}{name}.correction_A"] = c.a.detach().float().contiguous()
            scaled = c.b.detach().float() * layer.scaling[adapter_name]
            tensors[f"{PEFT_PREFIX}{name}.correction_B"] = scaled.contiguous()
    return tensors


def save_correction(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / CORRECTION_NAME), metadata={"format": FORMAT, "version": "1"})


def load_correction(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default") -> int:
    """Freeze the folder's correction beside adapter ``adapter_name`` on every layer it names; returns how many.

    Strict: a missing file, a layer without that adapter, a misshapen or missing tensor is an AdapterError
    naming it, before any layer is changed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / CORRECTION_NAME
    if not path.is_file():
        raise AdapterError(f"{path} is missing: the adapter's training record says it was trained beside a frozen "
                           "correction of the 4-bit base; copy the whole adapter folder, or apply it to the "
                           "full-precision base (--base original)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path} cannot be read ({exc}); the file is damaged") from None
    layers = dict(lora_layers(model))
    pairs = {}
    for key in tensors:
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".correction_A", ".correction_B")):
            raise AdapterError(f"{path}: unexpected tensor {key!r}")
        name = key[len(PEFT_PREFIX):].rsplit(".", 1)[0]
        layer = layers.get(name)
        if layer is None or adapter_name not in layer.lora_A:
            raise AdapterError(f"{path}: {key!r} names a layer the adapter does not adapt")
        a, b = tensors.get(f"{PEFT_PREFIX}{name}.correction_A"), tensors.get(f"{PEFT_PREFIX}{name}.correction_B")
        if a is None or b is None or a.ndim != 2 or b.shape != (layer.out_features, a.shape[0]) \
                or a.shape[1] != layer.in_features:
            raise AdapterError(f"{path}: the correction of {name} is incomplete or misshapen")
        pairs[name] = (a, b / layer.scaling[adapter_name])
    for name, (a, b) in pairs.items():
        layers[name].set_correction(adapter_name, a.to(layers[name].base_device()), b.to(layers[name].base_device()))
    return len(pairs)
