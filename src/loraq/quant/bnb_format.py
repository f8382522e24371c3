"""Hugging Face folders in the bitsandbytes pre-quantized 4-bit format, written and read without bitsandbytes.

A folder is a plain transformers folder (config.json, safetensors, tokenizer)
in which every quantized linear ``X`` is stored as bitsandbytes stores it
(``X.weight`` packed uint8 plus the quant-state tensors of
:mod:`loraq.quant.state_io`), and config.json carries
``quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": true,
"bnb_4bit_quant_type": ..., "bnb_4bit_use_double_quant": ...,
"bnb_4bit_compute_dtype": ..., "bnb_4bit_quant_storage": "uint8", ...}``.
``transformers.AutoModelForCausalLM.from_pretrained`` with bitsandbytes
installed loads such a folder as its own; :func:`load_quantized_folder`
loads one (ours or transformers') into Linear4bit layers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from loraq.errors import ModelError
from loraq.models.hf_folder import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    tied_keys_to_drop,
    write_config,
    write_generation_config,
    write_state_dict,
    write_tokenizer,
)
from loraq.paths import atomic_dir
from loraq.quant.linear import Linear4bit
from loraq.quant.state_io import PACKED_STATE_PREFIX, state_from_tensors

DTYPE_LONG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def quantization_config_dict(quant_type: str = "nf4", double_quant: bool = True,
                             compute_dtype: torch.dtype = torch.bfloat16, skip_modules: list[str] | None = None) -> dict:
    """config.json's ``quantization_config``, with the keys transformers writes for a 4-bit bitsandbytes model."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": DTYPE_LONG_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def is_bnb_4bit_config(config: Any) -> bool:
    """Whether a transformers config (object or dict) describes a bitsandbytes 4-bit checkpoint."""
    if not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, Mapping):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))


def quantized_layer_names(keys) -> list[str]:
    """Module names that a checkpoint stores in 4-bit (those with a ``.weight.quant_state.bitsandbytes__*`` key)."""
    marker = ".weight." + PACKED_STATE_PREFIX
    return sorted({k.split(marker)[0] for k in keys if marker in k})


def linear4bit_from_bnb_tensors(prefix: str, tensors: Mapping[str, torch.Tensor],
                                compute_dtype: torch.dtype = torch.bfloat16) -> Linear4bit:
    """The Linear4bit stored under module name ``prefix`` (``prefix.weight``, ``prefix.weight.absmax``, ...)."""
    key = prefix + ".weight"
    if key not in tensors:
        raise ModelError(f"{key} is missing from the checkpoint")
    state_tensors = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
    packed = tensors[key].reshape(-1, 1)
    state = state_from_tensors(packed, state_tensors, key)
    return Linear4bit(packed, state, tensors.get(prefix + ".bias"), compute_dtype)


def _quant_settings(model: nn.Module) -> tuple[str, bool, torch.dtype]:
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ModelError("the model has no 4-bit layers to save in the bitsandbytes format")
    settings = {(m.quant_state.quant_type, m.quant_state.double_quant, m.quant_state.blocksize, m.compute_dtype)
                for m in layers}
    if len(settings) != 1:
        raise ModelError(f"the bitsandbytes format needs one setting for all 4-bit layers; found {sorted(map(str, settings))}")
    quant_type, double_quant, _blocksize, compute_dtype = settings.pop()
    return quant_type, double_quant, compute_dtype


def save_quantized_folder(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False,
                          max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``model`` (Linear4bit layers + full-precision rest) as a bitsandbytes pre-quantized HF folder.

    Written under a temporary name and renamed into place; an existing
    ``out_dir`` is replaced only with ``overwrite``.
    """
    quant_type, double_quant, compute_dtype = _quant_settings(model)
    state = model.state_dict()
    for key in tied_keys_to_drop(state, model.config):
        state.pop(key)
    config = model.config.__class__.from_dict(model.config.to_dict())
    # name the full-precision linears (the head) outright, so transformers keeps exactly these unconverted
    kept = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    config.quantization_config = quantization_config_dict(quant_type, double_quant, compute_dtype, kept or None)
    dtype = model.get_input_embeddings().weight.dtype
    with atomic_dir(Path(out_dir), replace=overwrite) as tmp:
        write_state_dict(state, tmp, max_shard_bytes=max_shard_bytes)
        write_config(config, tmp, dtype=dtype, drop_quantization=False)
        write_generation_config(model, tmp)
        write_tokenizer(tokenizer, tmp)
    return Path(out_dir)


def read_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors (one file or shards with an index)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file():
        files = sorted(set(json.loads((folder / SAFE_INDEX).read_text())["weight_map"].values()))
    elif (folder / SAFE_WEIGHTS).is_file():
        files = [SAFE_WEIGHTS]
    else:
        raise ModelError(f"{folder}: no {SAFE_WEIGHTS} or {SAFE_INDEX}; expected a safetensors model folder")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def load_quantized_folder(folder: Path, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM from a bitsandbytes 4-bit folder, its 4-bit layers as Linear4bit; no bitsandbytes needed.

    ``compute_dtype`` defaults to the folder's ``bnb_4bit_compute_dtype``.
    Loads the whole checkpoint into memory (fine for the models quant/ tests
    and benchmarks; the low-memory path belongs to loraq.models).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(folder))
    if not is_bnb_4bit_config(config):
        raise ModelError(f"{folder}/config.json has no bitsandbytes 4-bit quantization_config")
    qc = config.quantization_config if isinstance(config.quantization_config, Mapping) else config.quantization_config.to_dict()
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise ModelError(f"{folder}: bnb_4bit_quant_storage {qc['bnb_4bit_quant_storage']!r} is not supported; only uint8")
    compute_dtype = compute_dtype or getattr(torch, qc.get("bnb_4bit_compute_dtype") or "float32")
    del config.quantization_config
    tensors = read_folder_tensors(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    quantized = quantized_layer_names(tensors)
    for name in quantized:
        model.set_submodule(name, linear4bit_from_bnb_tensors(name, tensors, compute_dtype))
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(name + ".") for name in quantized)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(n + "." for n in quantized))]
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ModelError(f"{folder}: checkpoint does not match config.json (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval()
