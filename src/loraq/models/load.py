"""Load a model and its tokenizer for fine-tuning or generation.

``load_model(spec, method=...)`` resolves ``spec`` (:func:`~loraq.models.source.resolve_source`),
checks it is safe to load (:mod:`loraq.models.safety`), then:

* ``lora`` / ``full``: the model in the compute dtype (bf16/fp16/fp32), read by
  transformers from safetensors (pickles only with ``allow_pickle``);
* ``qlora``: low-memory 4-bit loading (:mod:`loraq.models.lowmem`): tensor by
  tensor from the files, every linear layer but the output head quantized to
  a :class:`~loraq.quant.linear.Linear4bit` as it arrives, everything else in
  the compute dtype; the full-precision model is never in memory;
* a bitsandbytes 4-bit folder (``bnb4bit``): its packed tensors go straight into
  Linear4bit layers (:mod:`loraq.models.prequantized`); only ``qlora`` applies.

The tokenizer (with its chat template) always comes from the same folder.
The model is returned in eval mode on ``device`` (default: the best available).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraq.choices import METHODS, QUANT_TYPES
from loraq.devices import default_device, resolve_dtype
from loraq.errors import ConfigError, ModelError
from loraq.kernels import install as install_kernels
from loraq.models.hf_calls import LOAD_ERRORS, exception_line, quiet_transformers
from loraq.models.safety import WeightFiles, check_remote_code, weight_files
from loraq.models.skeleton import missing_tensors_error
from loraq.models.source import ModelSource, read_config, resolve_source

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    ``dtype`` is the compute dtype; ``quantized_modules`` names the layers held
    as Linear4bit (empty for ``lora``/``full``).
    """

    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource
    dtype: torch.dtype
    method: str
    quantized_modules: list[str] = field(default_factory=list)


def load_model(
    spec: str | Path | ModelSource | None = None,
    *,
    method: str = "qlora",
    dtype: str | torch.dtype = "auto",
    quant: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load ``spec`` (None: the default model) for ``method``; see the module docstring."""
    _check_options(method, quant, blocksize)
    install_kernels()  # the 4-bit fast paths, before any layer dequantizes
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec, allow_pickle=allow_pickle)
    label = source.origin or source.name
    files = check_loadable(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = resolve_dtype(dtype, device)

    quantized: list[str] = []
    with quiet_transformers():
        if source.kind == "bnb4bit":
            if method != "qlora":
                raise ModelError(
                    f"--model {label}: this checkpoint is already 4-bit (bitsandbytes); use --method qlora, "
                    f"or pass the original full-precision model for --method {method}"
                )
            from loraq.models.prequantized import load_prequantized

            model, quantized = load_prequantized(source.path, files, compute_dtype, device, trust_remote_code, label)
        elif method == "qlora":
            from loraq.models.lowmem import load_quantized

            model, quantized = load_quantized(source.path, files, compute_dtype, device, trust_remote_code, label,
                                              quant_type=quant, double_quant=double_quant, blocksize=blocksize)
        else:
            model = _load_full_precision(source.path, files, compute_dtype, trust_remote_code, label).to(device)
        # after the model: its parsed vocabulary would otherwise sit under the loading peak
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model.eval()
    contiguous_head_input(model)
    return LoadedModel(model, tokenizer, source, compute_dtype, method, quantized)


def check_loadable(source: ModelSource, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> WeightFiles:
    """What :func:`load_model` checks before the slow part: config.json, remote code, safe weight files,
    tokenizer files."""
    label = source.origin or source.name
    config = read_config(source.path, label)
    check_remote_code(config, trust_remote_code, label)
    files = weight_files(source.path, allow_pickle=allow_pickle, label=label)
    _check_tokenizer_files(source, label)
    return files


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Hand the output head contiguous hidden states.

    Generation slices the last position (``hidden[:, -1:, :]``, a strided view). For such an input and a
    weight that does not require grad -- a frozen head, as under LoRA -- ``torch.matmul`` on the CPU stops
    folding the batch into one matrix product and broadcasts the [vocab, hidden] weight over the batch
    instead, a copy of vocab x batch x hidden (bench/NOTES.md, item 4). A contiguous input
    (a few KB copy) keeps the single product.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def load_tokenizer(spec: str | Path | ModelSource | None = None, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer (and chat template) stored with the model ``spec``."""
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    label = source.origin or source.name
    _check_tokenizer_files(source, label)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise ModelError(f"--model {label}: cannot load its tokenizer ({exception_line(exc)})") from None


def _check_tokenizer_files(source: ModelSource, label: str) -> None:
    if not any((source.path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"--model {label}: no tokenizer files "
                         f"(tokenizer.json or tokenizer_config.json) in {source.path}")


def _check_options(method: str, quant: str, blocksize: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of: {', '.join(METHODS)}")
    if quant not in QUANT_TYPES:
        raise ConfigError(f"--quant {quant!r} is not one of: {', '.join(QUANT_TYPES)}")
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ConfigError(f"--blocksize {blocksize!r} must be a power of two from 32 to 4096")


def _load_full_precision(folder: Path, files: WeightFiles, dtype: torch.dtype, trust_remote_code: bool,
                         label: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=files.format == "safetensors",
            trust_remote_code=trust_remote_code, output_loading_info=True,
        )
    except LOAD_ERRORS as exc:
        raise ModelError(f"--model {label}: cannot load its weights ({exception_line(exc)})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise missing_tensors_error(label, missing)
    return model
