"""``loraq merge`` as a function: base model + adapter -> one model folder.

Each adapted layer becomes ``W0 + s B A`` (float32 sum, rounded once to the
output dtype). Which ``W0`` (``into``):

* ``dequantized`` (the default for a QLoRA adapter): the 4-bit weights it was
  trained on, dequantized -- the function that was trained, in 16 bits;
* ``original`` (the default for any other adapter): the full-precision
  weights, as PEFT's ``merge_and_unload`` on the original model does;
* ``requantized``: the ``dequantized`` merge quantized again to 4-bit with the
  base's settings, written in the bitsandbytes folder format, with the error
  re-quantizing added reported (relative Frobenius norm).

The folder holds safetensors weights, config.json, generation_config.json
and the tokenizer with its chat template: transformers loads it without loraq.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraq.choices import MERGE_INTO, WEIGHT_DTYPES
from loraq.errors import ConfigError
from loraq.outputs import check_output_folder, write_marker


def merge(
    model: str | Path | None = None,
    adapter: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str = "bf16",
    into: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    ignore_base_fingerprint: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Merge ``adapter`` into its base and write the folder ``out``; returns a report (see the module docstring).

    ``model`` None: the base the adapter was trained on (or names). An
    existing non-empty ``out`` is replaced only with ``overwrite=True``;
    nothing is written on any error.
    """
    from loraq.lora.adapted import load_adapted, plan_base
    from loraq.lora.model import merge_and_unload
    from loraq.paths import atomic_dir

    if adapter is None:
        raise ConfigError("--adapter is required: the adapter folder to merge")
    if out is None:
        raise ConfigError("--out is required: the folder to write the merged model to")
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of: {', '.join(WEIGHT_DTYPES)}")
    if into not in MERGE_INTO:
        raise ConfigError(f"--into {into!r} is not one of: {', '.join(MERGE_INTO)}")
    torch_dtype, out = WEIGHT_DTYPES[dtype], Path(out)
    # a bad adapter or base fails here, before loading
    plan = plan_base(adapter, model, base="auto", allow_pickle=allow_pickle,
                     ignore_base_fingerprint=ignore_base_fingerprint, warn=lambda _: None)
    into = resolve_into(into, plan.record)
    check_output_folder(out, overwrite, inputs=[Path(adapter), plan.source.path])
    loaded = load_adapted(adapter, model, base="original" if into == "original" else "trained",
                          dtype=dtype if into == "original" else "auto", device="cpu", allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code, ignore_base_fingerprint=ignore_base_fingerprint,
                          say=say)
    base = loaded.model
    report = merge_and_unload(base, dtype=torch_dtype, requantize=into == "requantized")
    with atomic_dir(out, replace=True) as tmp:
        files = _write(base, loaded.tokenizer, tmp, torch_dtype, into)
        write_marker(tmp, "merge")
    result = {"out": str(out), "base": loaded.source.origin or loaded.source.name, "adapter": str(adapter),
              "dtype": dtype, "into": into, "merged_layers": len(report.merged), "files": files}
    if report.requantized:
        result["requantize_error"] = report.requantize_error_overall
        result["requantize_error_worst"] = max(report.requantize_error.values())
    return result


def resolve_into(into: str, record: Any) -> str:
    """``auto`` -> ``dequantized`` for an adapter trained on a 4-bit base, else ``original``."""
    four_bit = record is not None and record.quant is not None
    if into == "auto":
        return "dequantized" if four_bit else "original"
    if into in ("dequantized", "requantized") and record is not None and not four_bit:
        raise ConfigError(f"--into {into}: this adapter was trained on a full-precision base ({record.compute_dtype}), "
                          "not a 4-bit one; use --into original")
    return into


def _write(model: torch.nn.Module, tokenizer: Any, folder: Path, dtype: torch.dtype, into: str) -> list[str]:
    from loraq.models.hf_folder import write_model_folder

    if into == "requantized":
        from loraq.models.bnb_folder import write_quantized_folder

        _cast_dense(model, dtype)
        write_quantized_folder(model, tokenizer, folder)
        return sorted(p.name for p in folder.glob("*.safetensors*"))
    dequantize_remaining(model, dtype)
    return write_model_folder(model, tokenizer, folder, dtype)


def _cast_dense(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Everything but the packed 4-bit codes to ``dtype`` (embeddings, norms, head, biases)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def dequantize_remaining(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace the 4-bit layers the adapter did not touch by plain ``nn.Linear`` (``Conv1D`` where the model
    has one) in ``dtype``."""
    from loraq.lora.layer import conv1d_layout, is_4bit
    from loraq.lora.model import set_submodule
    from loraq.modules import dense_layer

    names = [n for n, m in model.named_modules() if n and is_4bit(m)]
    for name in names:
        layer = model.get_submodule(name)
        set_submodule(model, name, dense_layer(layer.dequantize(dtype), layer.bias, dtype, conv1d_layout(layer)))
    return names
