"""A model's tensors as a lazy stream: names and shapes first, each tensor produced only when asked for.

The GGUF writer needs every tensor's name, shape and type before the first
byte of data (the tensor infos precede the data), and then the data one
tensor at a time. A :class:`LazyTensor` carries the first two and a ``load()``
that produces the data, so only one tensor (and its converted copy) is ever
in memory. Names are the checkpoint keys of the plain (merged) model, as
``model.state_dict()`` of a transformers causal LM spells them.

Two sources:

* :func:`folder_tensors`: a Hugging Face folder's safetensors, each tensor
  read on its own; in a bitsandbytes 4-bit folder each 4-bit layer's packed
  codes and scales are read together and dequantized by loraq's engine;
* :func:`model_tensors`: a model in memory. A ``LoraLinear`` yields
  ``W0 + sum_a s_a B_a A_a`` (float32, the 4-bit base dequantized) computed
  when its turn comes; a ``Linear4bit`` yields its dequantized weight; a
  ``ModulesToSave`` yields the tensors of its active module. A parameter
  shared by two modules (tied embeddings) is listed once, under its first name.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraq.errors import ModelError


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to be produced later: its checkpoint key, its shape and the function that makes it."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


@contextlib.contextmanager
def folder_tensors(folder: Path, config: Any, label: str) -> Iterator[list[LazyTensor]]:
    """The tensors of the HF folder ``folder`` (files kept open while the caller writes)."""
    from loraq.models.safety import weight_files
    from loraq.models.skeleton import open_safetensors
    from loraq.quant.bnb_format import quantized_layer_names

    files = weight_files(folder, allow_pickle=False, label=label)  # safetensors only: nothing is unpickled
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(open_safetensors(path)) for path in files.files}
        where = {key: handle for handle in handles.values() for key in handle.keys()}
        layers = quantized_layer_names(where)
        owned = {key for name in layers for key in where if key.startswith(name + ".weight")}
        out = [_dequantized_layer(name, where) for name in layers]
        out += [_stored(key, where[key]) for key in where if key not in owned]
        yield _without_tied_head(out, config)


def _stored(key: str, handle: Any) -> LazyTensor:
    shape = tuple(handle.get_slice(key).get_shape())
    return LazyTensor(_plain_key(key), shape, lambda: handle.get_tensor(key))


def _dequantized_layer(name: str, where: dict[str, Any]) -> LazyTensor:
    """A bitsandbytes 4-bit layer's ``weight``, dequantized to float32 when loaded."""
    from loraq.quant.bnb_format import linear4bit_from_bnb_tensors
    from loraq.quant.state_io import PACKED_STATE_PREFIX

    keys = [k for k in where if k.startswith(name + ".weight")]
    meta_key = next(k for k in keys if PACKED_STATE_PREFIX in k)
    shape = tuple(json.loads(bytes(where[meta_key].get_tensor(meta_key).numpy()).decode("utf-8"))["shape"])

    def load() -> torch.Tensor:
        pieces = {k: where[k].get_tensor(k) for k in keys}
        return linear4bit_from_bnb_tensors(name, pieces, torch.float32).dequantize(torch.float32)

    return LazyTensor(_plain_key(name + ".weight"), shape, load)


def _plain_key(key: str) -> str:
    """Keys of a bare base-model checkpoint (``layers.0...``) as the causal LM names them (``model.layers.0...``)."""
    return key if key.startswith(("model.", "lm_head.")) else f"model.{key}"


def _without_tied_head(tensors: list[LazyTensor], config: Any) -> list[LazyTensor]:
    """A tied model computes its logits with the embedding: a stored ``lm_head.weight`` is not used, so not written."""
    if getattr(config, "tie_word_embeddings", False):
        return [t for t in tensors if t.name != "lm_head.weight"]
    return tensors


def model_tensors(model: nn.Module) -> list[LazyTensor]:
    """The tensors of ``model`` as its merged plain twin would hold them (see the module docstring)."""
    out: list[LazyTensor] = []
    _walk(model, "", out, seen=set())
    return out


def _walk(module: nn.Module, prefix: str, out: list[LazyTensor], seen: set[int]) -> None:
    from loraq.lora.layer import LoraLinear, ModulesToSave, is_4bit

    if isinstance(module, ModulesToSave):
        return _walk(module.active_module(), prefix, out, seen)
    if isinstance(module, LoraLinear):
        shape = (module.out_features, module.in_features)
        out.append(LazyTensor(prefix + "weight", shape, lambda m=module: m.merged_weight(torch.float32)))
        return _add(module.base.bias, prefix + "bias", out, seen)
    if is_4bit(module):
        shape = (module.out_features, module.in_features)
        out.append(LazyTensor(prefix + "weight", shape, lambda m=module: m.dequantize(torch.float32)))
        return _add(module.bias, prefix + "bias", out, seen)
    for name, param in module._parameters.items():
        _add(param, prefix + name, out, seen)
    for name, buf in module._buffers.items():
        if name not in module._non_persistent_buffers_set:
            _add(buf, prefix + name, out, seen)
    for name, child in module._modules.items():
        if child is not None:
            _walk(child, f"{prefix}{name}.", out, seen)


def _add(tensor: torch.Tensor | None, key: str, out: list[LazyTensor], seen: set[int]) -> None:
    if tensor is None or id(tensor) in seen:
        return
    if tensor.is_meta:
        raise ModelError(f"GGUF export: {key} has no data (still on the meta device)")
    seen.add(id(tensor))
    out.append(LazyTensor(key, tuple(tensor.shape), lambda t=tensor: t.detach()))
