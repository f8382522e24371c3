"""``quantize(...)``: write a 4-bit copy of a model in the bitsandbytes format (``loraq quantize``).

Every linear layer but the output head is quantized (embeddings, norms and
the head stay as stored); tokenizer, config and generation config are
copied. The result is a folder that transformers + bitsandbytes loads as its
own and that loraq loads without bitsandbytes.
"""
from __future__ import annotations

import time
from pathlib import Path

from loraq.choices import QUANT_TYPES, WEIGHT_DTYPES
from loraq.devices import dtype_name
from loraq.errors import ConfigError, ModelError
from loraq.models.bnb_folder import save_quantized_folder
from loraq.models.hf_calls import quiet_transformers
from loraq.models.hf_folder import SAFE_INDEX, SAFE_WEIGHTS
from loraq.outputs import check_output_folder
from loraq.quant.bnb_format import is_bnb_4bit_config
from loraq.quant.functional import BLOCKSIZES
from loraq.quant.model import quantize_model_


def quantize(model: str | Path | None = None, out: str | Path | None = None, quant: str = "nf4",
             double_quant: bool = True, blocksize: int = 64, compute_dtype: str = "bf16",
             overwrite: bool = False) -> dict:
    """Quantize ``model`` (a local HF folder with safetensors; None: the default model) into ``out``.

    Returns a report: the layers quantized, bytes before and after, and the
    stored bits per parameter over the quantized layers (``4 + 8/64 +
    32/(64*256) = 4.127`` for NF4 with double quantization at blocksize 64).
    """
    started = time.perf_counter()
    out = _check_arguments(out, quant, blocksize, compute_dtype)
    source = _source_folder(model)
    check_output_folder(out, overwrite, inputs=[source])
    hf_model, tokenizer = _load(source)
    names = quantize_model_(hf_model, quant, double_quant, blocksize, WEIGHT_DTYPES[compute_dtype])
    layers = [hf_model.get_submodule(n) for n in names]
    save_quantized_folder(hf_model, tokenizer, out, overwrite=out.exists(), command="quantize")
    params = sum(layer.quant_state.numel for layer in layers)
    stored_bits = sum(layer.weight.numel() * 8 + layer.quant_state.scale_bits for layer in layers)
    return {
        "source": str(source),
        "out": str(out),
        "quant": quant,
        "double_quant": double_quant,
        "blocksize": blocksize,
        "compute_dtype": compute_dtype,
        "weights_dtype": dtype_name(hf_model.get_input_embeddings().weight.dtype),
        "layers_quantized": len(names),
        "params_quantized": params,
        "bits_per_param": stored_bits / params if params else 0.0,
        "weights_bytes_before": _weights_bytes(source),
        "weights_bytes_after": _weights_bytes(out),
        "folder_bytes_before": _folder_bytes(source),
        "folder_bytes_after": _folder_bytes(out),
        "seconds": time.perf_counter() - started,
    }


def _check_arguments(out, quant: str, blocksize: int, compute_dtype: str) -> Path:
    if out is None:
        raise ConfigError("--out is required: the folder to write the quantized model to")
    if quant not in QUANT_TYPES:
        raise ConfigError(f"--quant {quant!r} is not one of: {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"--blocksize {blocksize} is not supported; use a power of two from 32 to 4096 (default 64)")
    if compute_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--compute-dtype {compute_dtype!r} is not one of: {', '.join(WEIGHT_DTYPES)}")
    return Path(out).expanduser()


def _source_folder(model) -> Path:
    if model is None:
        from loraq.models.default import ensure_default_model

        return ensure_default_model()
    folder = Path(model).expanduser()
    if not folder.exists():
        raise ModelError(f"--model {model}: no such folder; give a Hugging Face model folder with safetensors")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelError(f"--model {model}: not a Hugging Face model folder (no config.json)")
    if not ((folder / SAFE_WEIGHTS).is_file() or (folder / SAFE_INDEX).is_file()):
        raise ModelError(f"--model {model}: no {SAFE_WEIGHTS} or {SAFE_INDEX}; loraq quantize reads safetensors only")
    return folder


def _load(folder: Path):
    """The model in the dtype it is stored in (quantized from exactly those weights), and its tokenizer if any."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {folder}: unreadable config.json ({exc})") from None
    if is_bnb_4bit_config(config):
        raise ModelError(f"--model {folder}: this model is already 4-bit quantized")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"--model {folder}: cannot load it as a causal LM ({str(exc).splitlines()[0]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # a weights-only folder: the quantized copy has no tokenizer either
    return model.eval(), tokenizer


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())

