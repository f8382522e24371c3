"""Low-memory QLoRA loading: tensor by tensor from the files, each linear layer quantized as it arrives.

The model is built on the meta device (:mod:`loraq.models.skeleton`); then
each checkpoint tensor is read on its own and

* the weight of every ``nn.Linear`` except the output head becomes a
  :class:`~loraq.quant.linear.Linear4bit` right away: quantized from the
  weight as stored in the file (not rounded to the compute dtype first), so
  it is bit for bit ``quantize_4bit(original weight)``; its bias is kept in the
  compute dtype;
* every other tensor (embeddings, norms, the output head) is cast to the
  compute dtype (integer tensors keep theirs).

The full-precision tensor is dropped as soon as it has been consumed, so the
peak memory is the quantized model plus one full-precision tensor (and the
quantizer's temporaries for it), never the full-precision model. Tied weights
stay tied (the head shares the embedding); rotary frequencies are computed
as transformers computes them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from loraq.models.safety import WeightFiles
from loraq.models.skeleton import build_skeleton, finish, iter_checkpoint_tensors, module_and_leaf, set_tensor, tied_targets

log = logging.getLogger(__name__)


def load_quantized(folder: Path, files: WeightFiles, compute_dtype: torch.dtype, device: torch.device,
                   trust_remote_code: bool, label: str, *, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64) -> tuple[nn.Module, list[str]]:
    """Build the model of ``folder`` with its linear layers in 4-bit; returns (model, quantized layer names)."""
    from loraq.quant.linear import Linear4bit
    from loraq.quant.model import linear_layer_names

    model = build_skeleton(folder, compute_dtype, trust_remote_code, label)
    targets = set(linear_layer_names(model))  # the layers quantize_model_ would convert
    skip = tied_targets(model)
    quantized: list[str] = []
    for key, tensor in iter_checkpoint_tensors(files, label):
        found = None if key in skip else module_and_leaf(model, key)
        if found is None:
            log.info("%s: ignoring %s (not a tensor of this architecture)", label, key)
            continue
        module, leaf = found
        module_name = key.rpartition(".")[0]
        if module_name in targets and leaf == "weight":
            layer = Linear4bit.from_linear(_as_linear(tensor.to(device)), quant_type=quant_type,
                                           double_quant=double_quant, blocksize=blocksize,
                                           compute_dtype=compute_dtype, name=key)
            layer.bias = module.bias  # loaded already, or still meta until its key comes
            model.set_submodule(module_name, layer)
            quantized.append(module_name)
        elif module_name in targets and leaf == "bias":
            module.bias = nn.Parameter(tensor.to(device, compute_dtype), requires_grad=False)
        else:
            set_tensor(module, leaf, tensor.to(device, compute_dtype) if tensor.is_floating_point() else tensor.to(device))
        del tensor
    finish(model, device, label)
    return model, sorted(quantized)


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear view of a weight, without allocating a second copy (for ``Linear4bit.from_linear``)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear
