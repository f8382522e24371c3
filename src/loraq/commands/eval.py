"""`loraq eval`: loss, perplexity and exact-match accuracy of a model (+ adapter) on a dataset."""
from __future__ import annotations

import argparse
import json

from loraq.api.loading import add_model_arguments, model_keywords
from loraq.choices import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.parquet file")
    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="data format (default: the adapter's training run's, else detected)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="cut longer examples to this many tokens (default: the training run's, else 2048)")
    parser.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=None,
                        help="also score prompt tokens (default: as the adapter's training run did, else no)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--max-examples", type=int, default=200,
                        help="examples with reference answers scored by exact match (0: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from loraq.api.evaluate import evaluate

    result = evaluate(args.data, format=args.format, seq_len=args.seq_len, train_on_inputs=args.train_on_inputs,
                      batch_size=args.batch_size, max_examples=args.max_examples, **model_keywords(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["format"] == "preference":
        print(f"{result['data']} (preference): {result['pairs']} pairs")
        print(f"preference accuracy {result['preference_accuracy']:.1%} (chosen answer likelier than the rejected one)")
        if result.get("reward_accuracy") is not None:
            print(f"against the base (adapter off): base preference accuracy {result['base_preference_accuracy']:.1%}, "
                  f"reward accuracy {result['reward_accuracy']:.1%}, margin {result['reward_margin']:.3f}")
        return 0
    print(f"{result['data']} ({result['format']}): {result['examples']} examples, {result['tokens']} scored tokens")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}")
    if result["exact_match"] is not None:
        print(f"exact match {result['exact_match']:.1%} on {result['exact_match_examples']} examples")
    return 0
