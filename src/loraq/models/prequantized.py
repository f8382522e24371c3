"""Pre-quantized bitsandbytes 4-bit folders, loaded without bitsandbytes, tensor by tensor.

Such a folder (written by transformers + bitsandbytes, or by ``loraq
quantize``) stores each 4-bit linear ``X`` as packed uint8 ``X.weight`` plus
its quant-state tensors (``X.weight.absmax``, ``X.weight.quant_map``, ...; see
:mod:`loraq.quant.state_io`). The file headers say which layers are 4-bit;
their pieces are gathered as they stream by and each layer becomes a
:class:`~loraq.quant.linear.Linear4bit` as soon as it is complete, its packed
codes and scales taken as they are (nothing is re-quantized). Every other
tensor is cast to the compute dtype. Weights are read from safetensors only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from loraq.errors import ModelError
from loraq.models.safety import WeightFiles
from loraq.models.skeleton import (
    build_skeleton,
    checkpoint_key_renamer,
    finish,
    iter_checkpoint_tensors,
    module_and_leaf,
    set_tensor,
    tied_targets,
)
from loraq.models.source import read_config
from loraq.modules import is_conv1d, linear_features

log = logging.getLogger(__name__)


def checkpoint_keys(files: WeightFiles) -> list[str]:
    """Every tensor name in the safetensors files, read from their headers only."""
    from safetensors import safe_open

    keys: list[str] = []
    for path in files.files:
        with safe_open(str(path), framework="pt") as f:
            keys.extend(f.keys())
    return keys


def load_prequantized(folder: Path, files: WeightFiles, compute_dtype: torch.dtype, device: torch.device,
                      trust_remote_code: bool, label: str) -> tuple[nn.Module, list[str]]:
    """Build the model of a bitsandbytes 4-bit ``folder``; returns (model, names of its Linear4bit layers)."""
    from loraq.quant.bnb_format import (
        linear4bit_from_bnb_tensors,
        quantized_layer_names,
    )

    if files.format != "safetensors":
        raise ModelError(f"--model {label}: pre-quantized checkpoints are read from safetensors only")
    storage = (read_config(folder, label).get("quantization_config") or {}).get("bnb_4bit_quant_storage", "uint8")
    if storage not in (None, "uint8"):
        raise ModelError(f"--model {label}: bnb_4bit_quant_storage {storage!r} is not supported; only uint8")
    model = build_skeleton(folder, compute_dtype, trust_remote_code, label)
    rename = checkpoint_key_renamer(model, label)
    keys = [rename(k) for k in checkpoint_keys(files)]
    layers = quantized_layer_names(keys)
    if not layers:
        raise ModelError(f"--model {label}: config.json says 4-bit, but the weights hold no 4-bit layers")
    owner = {k: name for name in layers for k in keys if k.startswith(name + ".")}
    still_needed = {name: sum(1 for k in keys if owner.get(k) == name) for name in layers}
    pieces: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}

    skip = tied_targets(model)
    for key, tensor in iter_checkpoint_tensors(files, label, rename):
        name = owner.get(key)
        if name is not None:
            pieces[name][key] = tensor.to(compute_dtype) if key == name + ".bias" else tensor
            still_needed[name] -= 1
            if still_needed[name] == 0:
                layer = linear4bit_from_bnb_tensors(name, pieces.pop(name), compute_dtype)
                layer.conv1d = _check_fits(model, name, layer, label)
                model.set_submodule(name, layer.to(device))
            continue
        found = None if key in skip else module_and_leaf(model, key)
        if found is None:
            log.info("%s: ignoring %s (not a tensor of this architecture)", label, key)
            continue
        set_tensor(found[1], found[2],
                   tensor.to(device, compute_dtype) if tensor.is_floating_point() else tensor.to(device))
    finish(model, device, label)
    return model, layers


def _check_fits(model: nn.Module, name: str, layer: nn.Module, label: str) -> bool:
    """The 4-bit layer has the shape of the architecture's layer ``name``; returns whether that is a Conv1D
    (whose weight bitsandbytes stores as ``[out, in]``, transposed from the Conv1D layout)."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"--model {label}: 4-bit layer {name} is not part of this architecture") from None
    try:
        in_features, out_features = linear_features(old)
    except AttributeError:
        in_features = out_features = None
    shape = (out_features, in_features)
    if shape != (layer.out_features, layer.in_features):
        raise ModelError(f"--model {label}: 4-bit layer {name} has shape {[layer.out_features, layer.in_features]}, "
                         f"config.json implies {list(shape)}")
    return is_conv1d(old)
