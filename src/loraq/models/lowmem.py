"""Low-memory QLoRA loading: tensor by tensor from the files, each linear layer quantized as it arrives.

The model is built on the meta device (:mod:`loraq.models.skeleton`); then
each checkpoint tensor is read on its own and

* the weight of every ``nn.Linear`` (and transformers ``Conv1D``) except the
  output head becomes a :class:`~loraq.quant.linear.Linear4bit` right away:
  quantized from the weight as stored in the file (not rounded to the compute
  dtype first), so it is bit for bit ``quantize_4bit(original weight)`` (a
  Conv1D weight transposed to ``[out, in]`` first, as transformers +
  bitsandbytes do); its bias is kept in the compute dtype;
* every other tensor (embeddings, norms, the output head) is cast to the
  compute dtype (integer tensors keep theirs).

The full-precision tensor is dropped as soon as it has been consumed, so the
peak memory is the quantized model plus one full-precision tensor (and the
quantizer's temporaries for it), never the full-precision model. Tied weights
stay tied (the head shares the embedding); rotary frequencies are computed
as transformers computes them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from loraq.models import quantized_cache
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
from loraq.modules import is_conv1d
from loraq.quant.linear import Linear4bit

if TYPE_CHECKING:
    from loraq.quant.functional import QuantState

log = logging.getLogger(__name__)

# elements quantized at a time: the quantizer's temporaries stay a few MB whatever the layer's size
CHUNK_NUMEL = 1 << 16


def load_quantized(folder: Path, files: WeightFiles, compute_dtype: torch.dtype, device: torch.device,
                   trust_remote_code: bool, label: str, *, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64) -> tuple[nn.Module, list[str]]:
    """Build the model of ``folder`` with its linear layers in 4-bit; returns (model, quantized layer names).

    The quantized layers of an earlier load of the same weights and settings come from the cache
    (:mod:`loraq.models.quantized_cache`), and their full-precision weights are then not read at all."""
    from loraq.quant.model import quantizable_layer_names

    model = build_skeleton(folder, compute_dtype, trust_remote_code, label)
    targets = set(quantizable_layer_names(model))  # the layers quantize_model_ would convert
    entry = _cache_key(model, files, targets, quant_type, double_quant, blocksize)
    cached = quantized_cache.read_layers(entry, sorted(targets), compute_dtype) if entry else None
    for name, layer in (cached or {}).items():
        _put_layer(model, name, layer.to(device))
    skip = tied_targets(model)
    quantized: list[str] = sorted(cached or ())
    for key, tensor in iter_checkpoint_tensors(files, label, checkpoint_key_renamer(model, label),
                                                wanted=_not_cached(model, cached)):
        found = None if key in skip else module_and_leaf(model, key)
        if found is None:
            log.info("%s: ignoring %s (not a tensor of this architecture)", label, key)
            continue
        module_name, module, leaf = found
        if module_name in targets and leaf == "weight":
            conv1d = is_conv1d(module)  # stored [in, out]: quantized as [out, in], as transformers + bitsandbytes do
            weight = tensor.to(device).t() if conv1d else tensor.to(device)
            packed, state = quantize_in_chunks(weight, blocksize, quant_type, double_quant, name=key)
            _put_layer(model, module_name, Linear4bit(packed, state, None, compute_dtype))
            quantized.append(module_name)
        elif module_name in targets and leaf == "bias":
            module.bias = nn.Parameter(tensor.to(device, compute_dtype), requires_grad=False)
        else:
            set_tensor(module, leaf,
                       tensor.to(device, compute_dtype) if tensor.is_floating_point() else tensor.to(device))
        del tensor
    finish(model, device, label)
    if entry and not cached:
        quantized_cache.write_layers(entry, {name: model.get_submodule(name) for name in quantized}, label)
    return model, sorted(quantized)


def _put_layer(model: nn.Module, name: str, layer: Linear4bit) -> None:
    """Put the 4-bit ``layer`` in place of the skeleton's layer ``name``, taking its layout and its bias (loaded
    already, or still meta until its key comes)."""
    old = model.get_submodule(name)
    layer.conv1d = is_conv1d(old)
    layer.bias = old.bias
    model.set_submodule(name, layer)


def _cache_key(model: nn.Module, files: WeightFiles, targets: set[str], quant_type: str, double_quant: bool,
               blocksize: int) -> str | None:
    """The quantized cache's key for this load, None when it is not cached (see its module docstring)."""
    params = sum(model.get_submodule(name).weight.numel() for name in targets)
    if files.format != "safetensors" or not quantized_cache.enabled(params):
        return None
    return quantized_cache.cache_key(list(files.files), sorted(targets), quant_type, double_quant, blocksize)


def _not_cached(model: nn.Module, cached: dict | None):
    """``wanted`` for the checkpoint reader: every key but the weights of the layers the cache gave."""
    if not cached:
        return None

    def wanted(key: str) -> bool:
        found = module_and_leaf(model, key)
        return found is None or found[0] not in cached or found[2] != "weight"

    return wanted


def quantize_in_chunks(weight: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool, name: str,
                       chunk_numel: int | None = None) -> tuple[torch.Tensor, QuantState]:
    """``quantize_4bit(weight)``, bit for bit, with temporaries bounded by ``chunk_numel`` elements.

    Blocks are independent: the flattened weight is cut at multiples of
    ``blocksize`` (so only the last chunk can end in a partial block), each
    chunk is quantized without double quantization, the packed bytes and the
    float32 absmax are concatenated, and the absmax vector is then
    double-quantized as a whole, exactly as ``quantize_4bit`` does it.
    """
    from loraq.quant.functional import compress_absmax, quantize_4bit

    flat = weight.reshape(-1)
    chunk_numel = chunk_numel or CHUNK_NUMEL
    step = max(blocksize, chunk_numel - chunk_numel % blocksize)
    if flat.numel() <= step:
        return quantize_4bit(weight, blocksize, quant_type, double_quant, name=name)
    packed_parts, absmax_parts, state = [], [], None
    for start in range(0, flat.numel(), step):
        packed, state = quantize_4bit(flat[start:start + step], blocksize, quant_type, False, name=name)
        packed_parts.append(packed)
        absmax_parts.append(state.absmax)
    state = dataclasses.replace(state, shape=torch.Size(weight.shape), dtype=weight.dtype,
                                absmax=torch.cat(absmax_parts))
    if double_quant:
        state = compress_absmax(state)
    return torch.cat(packed_parts), state
