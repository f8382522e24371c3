"""Hugging Face folders in the bitsandbytes pre-quantized 4-bit format, written and read without bitsandbytes.

A folder is a plain transformers folder (config.json, safetensors, tokenizer)
in which every quantized linear ``X`` is stored as bitsandbytes stores it
(``X.weight`` packed uint8 plus the quant-state tensors of
:mod:`loraq.quant.state_io`), and config.json carries
``quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": true,
"bnb_4bit_quant_type": ..., "bnb_4bit_use_double_quant": ...,
"bnb_4bit_compute_dtype": ..., "bnb_4bit_quant_storage": "uint8", ...}``.
``transformers.AutoModelForCausalLM.from_pretrained`` with bitsandbytes
installed loads such a folder as its own. This module is the tensor-level
format (a layer's keys, the config entry); writing and reading whole folders
is :mod:`loraq.models.bnb_folder` and :mod:`loraq.models.prequantized`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loraq.errors import ModelError
from loraq.quant.linear import Linear4bit
from loraq.quant.state_io import PACKED_STATE_PREFIX, state_from_tensors

DTYPE_LONG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def quantization_config_dict(quant_type: str = "nf4", double_quant: bool = True,
                             compute_dtype: torch.dtype = torch.bfloat16,
                             skip_modules: list[str] | None = None) -> dict:
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
