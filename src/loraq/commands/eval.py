"""`loraq eval`: loss, perplexity and exact-match accuracy of a model (+ adapter) on a dataset."""
from __future__ import annotations

import argparse
import json

from loraq.config import FORMATS
from loraq.inference import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.parquet file")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="data format (auto-detected by default)")
    parser.add_argument("--seq-len", type=int, default=2048, help="cut longer examples to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--max-examples", type=int, default=200,
                        help="examples with reference answers scored by exact match (0: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from loraq.errors import ConfigError
    from loraq.train.evaluate import evaluate_dataset

    for flag, value, lo in (("--seq-len", args.seq_len, 8), ("--batch-size", args.batch_size, 1), ("--max-examples", args.max_examples, 0)):
        if value < lo:
            raise ConfigError(f"{flag} must be at least {lo} (got {value})")
    from loraq.inference import load_for_inference

    loaded = load_for_inference(args)
    result = evaluate_dataset(loaded.model, loaded.tokenizer, args.data, fmt=args.format, seq_len=args.seq_len,
                              batch_size=args.batch_size, max_examples=args.max_examples)
    result["model"] = loaded.source.name
    result["adapter"] = args.adapter
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['data']} ({result['format']}): {result['examples']} examples, {result['tokens']} scored tokens")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}")
    if result["exact_match"] is not None:
        print(f"exact match {result['exact_match']:.1%} on {result['exact_match_examples']} examples")
    return 0
