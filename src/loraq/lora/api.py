"""``loraq merge`` as a function: base model + adapter -> one plain Hugging Face folder.

Each adapted layer becomes ``W0 + s B A`` (float32 sum, rounded once to the
output dtype); a 4-bit base is dequantized, never re-quantized. The folder
holds safetensors weights, config.json, generation_config.json and the
tokenizer with its chat template: transformers loads it without loraq.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from loraq.errors import ConfigError, LoraqError, ModelError

MERGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge(
    model: str | Path | None = None,
    adapter: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge ``adapter`` into ``model`` and write a plain HF folder at ``out``; returns a report.

    ``model`` None: the adapter's ``base_model_name_or_path`` when that is a
    local folder, else the default model. An existing non-empty ``out`` is
    replaced only with ``overwrite=True``; nothing is written on any error.
    """
    from loraq.lora.files import load_adapter, read_adapter_config
    from loraq.lora.model import merge_and_unload
    from loraq.models.hf_folder import (tied_keys_to_drop, write_config, write_generation_config, write_state_dict,
                                        write_tokenizer)
    from loraq.paths import atomic_dir

    if adapter is None:
        raise ConfigError("--adapter is required: the adapter folder to merge")
    if out is None:
        raise ConfigError("--out is required: the folder to write the merged model to")
    if dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of: {', '.join(MERGE_DTYPES)}")
    torch_dtype = MERGE_DTYPES[dtype]
    out = Path(out)
    config = read_adapter_config(adapter)  # a bad adapter folder fails before any model is loaded
    base_spec = model if model is not None else base_model_for(config.base_model_name_or_path)
    _check_out(out, overwrite, protect=[Path(adapter), Path(base_spec) if base_spec else None])

    base, tokenizer, base_name = load_base_model(base_spec, torch_dtype, trust_remote_code)
    load_adapter(base, adapter, allow_pickle=allow_pickle)
    report = merge_and_unload(base, dtype=torch_dtype)
    dequantize_remaining(base, torch_dtype)
    base.to(torch_dtype)

    state = base.state_dict()
    for key in tied_keys_to_drop(state, base.config):
        state.pop(key)
    with atomic_dir(out, replace=True) as tmp:
        files = write_state_dict(state, tmp)
        write_config(base.config, tmp, dtype=torch_dtype)
        write_generation_config(base, tmp)
        write_tokenizer(tokenizer, tmp)
    return {"out": str(out), "base": base_name, "adapter": str(adapter), "dtype": dtype,
            "merged_layers": len(report.merged), "files": files}


def base_model_for(base_model_name_or_path: str | None) -> str | None:
    """The base to merge into when ``--model`` is omitted (None: the default model).

    The adapter's ``base_model_name_or_path`` when it is a local folder or file
    or a hub id (``org/name``); the default model when the adapter names none or
    names the default; an error when it names a path that is not there (merging
    into some other model would be silently wrong).
    """
    from loraq.models.default import DEFAULT_HUB_ID, DEFAULT_MODEL_NAME

    name = (base_model_name_or_path or "").strip()
    if not name or name in (DEFAULT_HUB_ID, DEFAULT_MODEL_NAME):
        return None
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) and not name.startswith((".", "~")):
        return name
    raise ModelError(f"the adapter was made for {name!r}, which does not exist here; pass --model with that model")


def load_base_model(spec: str | Path | None, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer, name)`` for a merge, on the CPU; the one place a base model is loaded.

    Full precision in ``dtype`` (float32 for a float32 output, so nothing is
    rounded before the merge), or the 4-bit layers as they are for a
    pre-quantized (bitsandbytes) folder; :func:`merge_and_unload` dequantizes those.
    """
    from loraq.models.load import load_model
    from loraq.models.source import resolve_source

    source = resolve_source(None if spec is None else str(spec))
    method = "qlora" if source.kind == "bnb4bit" else "lora"
    loaded = load_model(source, method=method, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    return loaded.model, loaded.tokenizer, source.origin or source.name


def dequantize_remaining(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace the 4-bit layers the adapter did not touch by plain ``nn.Linear`` in ``dtype``."""
    from loraq.lora.layer import dense_linear, is_4bit
    from loraq.lora.model import set_submodule

    names = [n for n, m in model.named_modules() if n and is_4bit(m)]
    for name in names:
        layer = model.get_submodule(name)
        set_submodule(model, name, dense_linear(layer.dequantize(dtype), layer.bias, dtype))
    return names


def _check_out(out: Path, overwrite: bool, protect: list[Path | None]) -> None:
    if out.exists() and not out.is_dir():
        raise LoraqError(f"--out {out} is a file; give a folder")
    for p in protect:
        if p is not None and p.exists() and out.exists() and out.resolve() == p.resolve():
            raise LoraqError(f"--out {out} is an input of this merge; write the merged model to another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LoraqError(f"--out {out} exists and is not empty; pass --overwrite to replace it or choose another folder")
