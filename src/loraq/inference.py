"""Loading a model (and optionally an adapter) for generation and evaluation.

Shared by ``loraq generate``, ``loraq chat`` and ``loraq eval``: the base in
full precision by default, or in 4-bit (``quant="nf4"|"fp4"``, as QLoRA
trains it); a pre-quantized folder stays 4-bit.
"""
from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF folder, hub id, .gguf file or pre-quantized folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format) to apply to --model")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="compute dtype")
    parser.add_argument("--quant", default="none", choices=("none", "nf4", "fp4"),
                        help="load the base model in 4-bit, as QLoRA trains it (default: full precision)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle weights (only files you trust)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code to run")


def load_for_inference(args: argparse.Namespace) -> Any:
    """``LoadedModel`` for the flags of :func:`add_model_arguments`, the adapter applied."""
    from loraq.models.load import load_model
    from loraq.models.source import resolve_source

    model_spec = args.model
    if model_spec is None and args.adapter:
        model_spec = adapter_base_model(args.adapter)
    source = resolve_source(model_spec, allow_pickle=args.allow_pickle)
    method = "qlora" if args.quant != "none" or source.quantized else "lora"
    loaded = load_model(source, method=method, dtype=args.dtype, quant=args.quant if args.quant != "none" else "nf4",
                        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        from loraq.lora.files import load_adapter

        load_adapter(loaded.model, args.adapter, allow_pickle=args.allow_pickle)
    loaded.model.eval()
    return loaded


def adapter_base_model(adapter_dir: str) -> str | None:
    """The base an adapter names (a local folder, or a hub id loraq can resolve); None = the default model."""
    from pathlib import Path

    from loraq.lora.files import read_adapter_config
    from loraq.models.default import DEFAULT_HUB_ID

    base = read_adapter_config(adapter_dir).base_model_name_or_path
    if not base or base == DEFAULT_HUB_ID:
        return None
    return base if Path(base).exists() or "/" in base else None
