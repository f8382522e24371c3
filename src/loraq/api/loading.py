"""Loading a model (and optionally an adapter) for generation and evaluation.

Shared by ``loraq generate``, ``loraq chat`` and ``loraq eval``. With an
adapter, the base is the one it was trained on (:mod:`loraq.lora.adapted`): a
QLoRA adapter gets its 4-bit base with the recorded settings; ``--quant none``
asks for the full-precision base instead. Without one, the model in full
precision by default, or in 4-bit with ``--quant nf4|fp4``; a pre-quantized
folder stays 4-bit.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from loraq.choices import COMPUTE_DTYPES, INFERENCE_QUANT
from loraq.models.load import LoadedModel


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF folder, hub id, .gguf file or pre-quantized folder (default: the adapter's base, "
                             "else SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format) to apply to --model")
    parser.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES,
                        help="compute dtype (auto: the adapter's training dtype, else bf16 where native)")
    parser.add_argument("--quant", default="auto", choices=INFERENCE_QUANT,
                        help="the base's weights: auto = as the adapter was trained (4-bit for a QLoRA adapter), "
                             "else full precision; none = full precision; nf4/fp4 = quantize the base to 4-bit")
    add_trust_arguments(parser)


def add_trust_arguments(parser: argparse.ArgumentParser, action: str = "apply the adapter") -> None:
    """The flags that accept what loraq refuses by default (every command that loads an adapter)."""
    parser.add_argument("--ignore-base-fingerprint", action="store_true",
                        help=f"{action} even if --model's weights are not those it was trained on")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle weights (.bin/.pt: they can run code; only files you trust)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model folder's own Python code to run")


def load_for_inference(model: str | None = None, adapter: str | None = None, *, dtype: str = "auto",
                       quant: str = "auto", ignore_base_fingerprint: bool = False, allow_pickle: bool = False,
                       trust_remote_code: bool = False, say: Callable[[str], None] | None = None) -> LoadedModel:
    """The model (and adapter) for generation or evaluation, in eval mode; see the module docstring."""
    from loraq.errors import ConfigError

    if quant not in INFERENCE_QUANT:
        raise ConfigError(f"--quant {quant!r} is not one of: {', '.join(INFERENCE_QUANT)}")
    if adapter:
        from loraq.lora.adapted import load_adapted

        return load_adapted(adapter, model, base="original" if quant == "none" else "auto",
                            quant=quant if quant in ("nf4", "fp4") else None, dtype=dtype,
                            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                            ignore_base_fingerprint=ignore_base_fingerprint, say=say or _say)
    from loraq.models.load import load_model
    from loraq.models.source import resolve_source

    source = resolve_source(model, allow_pickle=allow_pickle)
    four_bit = quant in ("nf4", "fp4")
    loaded = load_model(source, method="qlora" if four_bit or source.quantized else "lora", dtype=dtype,
                        quant=quant if four_bit else "nf4", allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code)
    loaded.model.eval()
    return loaded


def model_keywords(args: argparse.Namespace) -> dict:
    """The API keyword arguments of the flags :func:`add_model_arguments` added."""
    return {"model": args.model, "adapter": args.adapter, "dtype": args.dtype, "quant": args.quant,
            "ignore_base_fingerprint": args.ignore_base_fingerprint, "allow_pickle": args.allow_pickle,
            "trust_remote_code": args.trust_remote_code}


def _say(message: str) -> None:
    print(f"loraq: {message}", file=sys.stderr, flush=True)
