"""`loraq quantize`: write a 4-bit (NF4/FP4) copy of a model in the bitsandbytes format."""
from __future__ import annotations

import argparse
import json

from loraq.choices import QUANT_TYPES, WEIGHT_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model folder with safetensors "
                             "(default: the default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True,
                        help="folder to write; refused if it exists and is not empty, unless --overwrite")
    parser.add_argument("--quant", default="nf4", choices=QUANT_TYPES, help="4-bit data type (default nf4)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="store the per-block scales in float32 instead of 8 bits "
                             "(4.5 instead of 4.127 bits/param)")
    parser.add_argument("--blocksize", type=int, default=64,
                        help="elements per scale: 32..4096, a power of two (default 64)")
    parser.add_argument("--compute-dtype", default="bf16", choices=tuple(WEIGHT_DTYPES),
                        help="dtype the 4-bit layers compute in once loaded (default bf16)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from loraq.api.quantize import quantize

    report = quantize(model=args.model, out=args.out, quant=args.quant, double_quant=args.double_quant,
                      blocksize=args.blocksize, compute_dtype=args.compute_dtype, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mb = 1e6
    dq = "double quant" if report["double_quant"] else "no double quant"
    print(f"quantized {report['layers_quantized']} linear layers to {report['quant']} ({dq}, blocksize "
          f"{report['blocksize']}, compute {report['compute_dtype']}) in {report['seconds']:.1f} s")
    print(f"  weights:      {report['weights_bytes_before'] / mb:8.1f} MB ({report['weights_dtype']}) -> "
          f"{report['weights_bytes_after'] / mb:8.1f} MB")
    print(f"  whole folder: {report['folder_bytes_before'] / mb:8.1f} MB -> "
          f"{report['folder_bytes_after'] / mb:8.1f} MB")
    print(f"  quantized layers: {report['params_quantized'] / 1e6:.1f}M parameters at "
          f"{report['bits_per_param']:.3f} bits/param (4-bit codes + scales); embeddings and head kept as stored")
    print(f"  wrote {report['out']}")
    return 0
