"""`loraq merge`: fold a LoRA adapter into its base model and write a model folder."""
from __future__ import annotations

import argparse

from loraq.api.loading import add_trust_arguments
from loraq.choices import MERGE_INTO, WEIGHT_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="base model: HF folder, hub id, .gguf file or pre-quantized folder "
                             "(default: the base the adapter was trained on, else the one it names)")
    parser.add_argument("--adapter", required=True,
                        help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument("--dtype", default="bf16", choices=tuple(WEIGHT_DTYPES), help="dtype of the merged weights")
    parser.add_argument("--into", default="auto", choices=MERGE_INTO,
                        help="the weights merged into: dequantized = the 4-bit base a QLoRA adapter was trained on "
                             "(the default for one), original = the full-precision weights (the default otherwise), "
                             "requantized = dequantized, then 4-bit again (a bitsandbytes folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    add_trust_arguments(parser, "merge")


def run(args: argparse.Namespace) -> int:
    from loraq.api.merge import merge

    report = merge(model=args.model, adapter=args.adapter, out=args.out, dtype=args.dtype, into=args.into,
                   overwrite=args.overwrite, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                   ignore_base_fingerprint=args.ignore_base_fingerprint)
    line = (f"merged {report['merged_layers']} LoRA layers of {report['adapter']} into {report['base']} "
            f"({report['into']}) -> {report['out']} ({report['dtype']})")
    if "requantize_error" in report:
        line += (f"; re-quantizing added a relative error of {report['requantize_error']:.3%} "
                 f"(worst layer {report['requantize_error_worst']:.3%})")
    print(line)
    return 0
