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

if TYPE_CHECKING:
    from loraq.quant.functional import QuantState

log = logging.getLogger(__name__)

# elements quantized at a time: the quantizer's temporaries stay a few MB whatever the layer's size
CHUNK_NUMEL = 1 << 16


def load_quantized(folder: Path, files: WeightFiles, compute_dtype: torch.dtype, device: torch.device,
                   trust_remote_code: bool, label: str, *, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64) -> tuple[nn.Module, list[str]]:
    """Build the model of ``folder`` with its linear layers in 4-bit; returns (model, quantized layer names)."""
    from loraq.quant.linear import Linear4bit
    from loraq.quant.model import quantizable_layer_names

    model = build_skeleton(folder, compute_dtype, trust_remote_code, label)
    targets = set(quantizable_layer_names(model))  # the layers quantize_model_ would convert
    skip = tied_targets(model)
    quantized: list[str] = []
    for key, tensor in iter_checkpoint_tensors(files, label, checkpoint_key_renamer(model, label)):
        found = None if key in skip else module_and_leaf(model, key)
        if found is None:
            log.info("%s: ignoring %s (not a tensor of this architecture)", label, key)
            continue
        module_name, module, leaf = found
        if module_name in targets and leaf == "weight":
            conv1d = is_conv1d(module)  # stored [in, out]: quantized as [out, in], as transformers + bitsandbytes do
            weight = tensor.to(device).t() if conv1d else tensor.to(device)
            packed, state = quantize_in_chunks(weight, blocksize, quant_type, double_quant, name=key)
            layer = Linear4bit(packed, state, None, compute_dtype, conv1d=conv1d)
            layer.bias = module.bias  # loaded already, or still meta until its key comes
            model.set_submodule(module_name, layer)
            quantized.append(module_name)
        elif module_name in targets and leaf == "bias":
            module.bias = nn.Parameter(tensor.to(device, compute_dtype), requires_grad=False)
        else:
            set_tensor(module, leaf,
                       tensor.to(device, compute_dtype) if tensor.is_floating_point() else tensor.to(device))
        del tensor
    finish(model, device, label)
    return model, sorted(quantized)


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
