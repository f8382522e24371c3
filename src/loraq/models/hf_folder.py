"""Writing plain Hugging Face model folders (safetensors + config + tokenizer).

Used wherever loraq emits a full model: the default-model cache, ``loraq
merge`` and ``loraq quantize``. The folder is written under a temporary name
and renamed into place (see :func:`loraq.paths.atomic_dir`). Large state dicts
are split into shards of at most ``max_shard_bytes`` with the usual
``model.safetensors.index.json``, so ``transformers`` reads them as its own.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def tied_keys_to_drop(state: Mapping[str, torch.Tensor], model: Any) -> set[str]:
    """Keys that alias another tensor in a tied model (transformers re-ties them on load): the model's own
    tied targets (``all_tied_weights_keys``: ``lm_head.weight``, GPT-NeoX's head, ...), whatever the head's
    name."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {key for key in tied if key in state}


def saved_state_dict(model: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` under the names transformers' ``save_pretrained`` gives them: tied copies
    dropped, and module names turned back into the architecture's file names (transformers' own reverse
    renaming: a GPT-NeoX head ``lm_head`` is stored as ``embed_out``). Floating tensors in ``dtype`` if given."""
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    for key in tied_keys_to_drop(state, model):
        state.pop(key)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings stores its modules' names
        return state
    return dict(revert_weight_conversion(model, state))


def write_state_dict(
    state: Mapping[str, torch.Tensor],
    folder: Path,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``state`` as one safetensors file or as shards with an index; returns file names."""
    folder = Path(folder)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses views that share storage; give each tensor its own
        shards[-1][key] = (tensor.detach().contiguous().clone() if _shares_storage(tensor)
                           else tensor.detach().contiguous())
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_WEIGHTS), metadata=metadata)
        return [SAFE_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=metadata)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFE_INDEX]


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def write_config(config: Any, folder: Path, dtype: torch.dtype | None = None, drop_quantization: bool = True) -> None:
    """Save a transformers config; ``dtype`` is recorded as the weights' dtype."""
    config = config.__class__.from_dict(config.to_dict())  # a copy: never mutate the caller's
    if drop_quantization and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(folder))


def write_tokenizer(tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def write_generation_config(model: Any, folder: Path) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(folder))
        except Exception:  # a generation config that fails its own validation is not worth failing a save
            pass


def write_model_folder(model: Any, tokenizer: Any, folder: Path, dtype: torch.dtype) -> list[str]:
    """A plain Hugging Face folder: weights (``dtype``, tied copies dropped), config, generation config, tokenizer."""
    files = write_state_dict(saved_state_dict(model, dtype), folder)
    write_config(model.config, folder, dtype=dtype)
    write_generation_config(model, folder)
    write_tokenizer(tokenizer, folder)
    return files
