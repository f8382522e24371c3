"""`loraq export`: write a model (or a model with an adapter merged, or the adapter alone) as a GGUF file."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from loraq.api.loading import add_trust_arguments
    from loraq.choices import EXPORT_FORMATS, GGUF_QUANTS, MERGE_INTO

    parser.add_argument("--model", default=None,
                        help="the model: HF folder, hub id, .gguf file or bitsandbytes 4-bit folder (dequantized); "
                             "with --adapter, its base (default: the base the adapter was trained on)")
    parser.add_argument("--adapter", default=None,
                        help="a run or adapter folder to merge in (or to write alone with --format gguf-lora)")
    parser.add_argument("--out", required=True,
                        help="the .gguf file to write (an Ollama X.Modelfile is written beside X.gguf)")
    parser.add_argument("--quant", default="q8_0", choices=GGUF_QUANTS, help="tensor types of the file (default: q8_0)")
    parser.add_argument("--format", default="gguf", choices=EXPORT_FORMATS,
                        help="gguf: the whole model; gguf-lora: the adapter alone, for llama.cpp's --lora")
    parser.add_argument("--into", default="auto", choices=MERGE_INTO,
                        help="the base the adapter is merged into, as in `loraq merge` (default: the one it was "
                             "trained on; a 4-bit base dequantized)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (a GGUF file)")
    add_trust_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loraq.api.export import export

    report = export(model=args.model, adapter=args.adapter, out=args.out, quant=args.quant, format=args.format,
                    into=args.into, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code, ignore_base_fingerprint=args.ignore_base_fingerprint)
    size_mb = report["bytes"] / 1e6
    if report["format"] == "gguf-lora":
        print(f"wrote {report['out']}: LoRA for {report['family']} ({report['layers']} layers, {size_mb:.1f} MB) "
              f"in {report['seconds']} s; apply it with llama.cpp's --lora on the base model's GGUF")
    else:
        types = ", ".join(f"{n} {k}" for k, n in sorted(report["types"].items()))
        print(f"wrote {report['out']}: {report['family']} ({report['arch']}), {report['quant']}, {size_mb:.1f} MB "
              f"({types}) in {report['seconds']} s; Ollama: ollama create NAME -f {report['modelfile']}")
    return 0
