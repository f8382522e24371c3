"""Writing a model whose linear layers are loraq ``Linear4bit`` as a bitsandbytes pre-quantized HF folder.

The format of each layer and of config.json's ``quantization_config`` is
:mod:`loraq.quant.bnb_format`'s; reading such a folder back is
:mod:`loraq.models.prequantized`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraq.errors import ModelError
from loraq.models.hf_folder import (
    saved_state_dict,
    write_config,
    write_generation_config,
    write_state_dict,
    write_tokenizer,
)
from loraq.modules import is_dense_linear
from loraq.outputs import write_marker
from loraq.paths import atomic_dir
from loraq.quant.bnb_format import quantization_config_dict
from loraq.quant.linear import Linear4bit


def _quant_settings(model: nn.Module) -> tuple[str, bool, torch.dtype]:
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ModelError("the model has no 4-bit layers to save in the bitsandbytes format")
    settings = {(m.quant_state.quant_type, m.quant_state.double_quant, m.quant_state.blocksize, m.compute_dtype)
                for m in layers}
    if len(settings) != 1:
        raise ModelError("the bitsandbytes format needs one setting for all 4-bit layers; "
                         f"found {sorted(map(str, settings))}")
    quant_type, double_quant, _blocksize, compute_dtype = settings.pop()
    return quant_type, double_quant, compute_dtype


def save_quantized_folder(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False,
                          max_shard_bytes: int = 5 * 1024**3, command: str | None = None) -> Path:
    """Write ``model`` (Linear4bit layers + full-precision rest) as a bitsandbytes pre-quantized HF folder.

    Written under a temporary name and renamed into place; an existing ``out_dir`` is replaced only with
    ``overwrite``. ``command``: mark the folder as that loraq command's output (:mod:`loraq.outputs`).
    """
    with atomic_dir(Path(out_dir), replace=overwrite) as tmp:
        write_quantized_folder(model, tokenizer, tmp, max_shard_bytes)
        if command is not None:
            write_marker(tmp, command)
    return Path(out_dir)


def write_quantized_folder(model: nn.Module, tokenizer: Any, folder: Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """The folder's files (weights with bnb's keys, config.json with ``quantization_config``, tokenizer), in place."""
    quant_type, double_quant, compute_dtype = _quant_settings(model)
    state = saved_state_dict(model)
    config = model.config.__class__.from_dict(model.config.to_dict())
    # name the full-precision linears (the head) outright, so transformers keeps exactly these unconverted
    kept = [name for name, module in model.named_modules() if is_dense_linear(module)]
    config.quantization_config = quantization_config_dict(quant_type, double_quant, compute_dtype, kept or None)
    write_state_dict(state, folder, max_shard_bytes=max_shard_bytes)
    write_config(config, folder, dtype=model.get_input_embeddings().weight.dtype, drop_quantization=False)
    write_generation_config(model, folder)
    write_tokenizer(tokenizer, folder)
