"""`loraq data FILE`: how loraq reads a dataset, before any training (the report: :mod:`loraq.api.data`)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from loraq.choices import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="dataset: .jsonl, .json, .csv, .parquet or .arrow file, a datasets save_to_disk "
                                     "folder, or a hub dataset id")
    parser.add_argument("--data-split", default=None, help="split of a Hugging Face dataset (default: train)")
    parser.add_argument("--data-config", default=None, help="configuration (subset) of a hub dataset")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: detected)")
    parser.add_argument("--model", default=None, help="model whose tokenizer and chat template to use "
                                                      "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seq-len", type=int, default=512, help="maximum tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch, for the padding share")
    parser.add_argument("--packing", action="store_true", help="pack several examples per sequence")
    parser.add_argument("--train-on-inputs", action="store_true", help="also train on prompt tokens")
    parser.add_argument("--skip-bad-examples", action="store_true",
                        help="skip and count bad records instead of stopping")
    parser.add_argument("--show", type=int, default=1, metavar="N", help="rendered examples to show (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from loraq.api.data import inspect_data

    report = inspect_data(args.file, data_split=args.data_split, data_config=args.data_config, format=args.format,
                          model=args.model, seq_len=args.seq_len,
                          batch_size=args.batch_size, packing=args.packing, train_on_inputs=args.train_on_inputs,
                          skip_bad_examples=args.skip_bad_examples, show=args.show)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def print_report(r: dict[str, Any]) -> None:
    from loraq.api.data import CLOSE, OPEN

    if r["format"] == "preference":
        print_pair_report(r)
        return
    lengths = r["tokens_per_example"]
    print(f"file:       {r['file']}")
    print(f"format:     {r['format']} ({r['format_source']})")
    _print_records(r)
    print(f"examples:   {r['examples']} ({r['truncated']} truncated, {r['dropped']} dropped with no trained "
          f"token left at --seq-len {r['seq_len']})")
    print(f"tokens:     {r['tokens']} total, {r['trained_tokens']} trained ({100 * r['trained_share']:.1f}%); "
          f"per example min {lengths['min']}, mean {lengths['mean']:.1f}, max {lengths['max']}")
    print(f"padding:    {100 * r['padding_fraction']:.1f}% without packing, "
          f"{100 * r['padding_fraction_packed']:.1f}% with --packing ({r['packed_rows']} packed rows)")
    print(f"tokens in:  {r['token_store']} (reused by the next run with the same data and settings)")
    for example in r["examples_shown"]:
        print(f"\n--- {example['where']}: {example['tokens']} tokens, {example['trained']} trained "
              f"(between {OPEN} and {CLOSE}) ---")
        print(example["text"])


def print_pair_report(r: dict[str, Any]) -> None:
    from loraq.api.data import CLOSE, OPEN

    print(f"file:       {r['file']}")
    print(f"format:     preference ({r['format_source']}): prompt, chosen and rejected answers")
    _print_records(r)
    print(f"pairs:      {r['pairs']} ({r['truncated']} with an answer cut at --seq-len {r['seq_len']}; "
          f"the prompt is always kept whole)")
    for key in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        v = r[key]
        print(f"{key.split('_')[0] + ':':<11} tokens per pair min {v['min']}, mean {v['mean']:.1f}, max {v['max']}")
    for example in r["examples_shown"]:
        print(f"\n--- {example['where']}: prompt {example['prompt_tokens']} tokens, chosen {example['chosen_tokens']}, "
              f"rejected {example['rejected_tokens']} (scored tokens between {OPEN} and {CLOSE}) ---")
        print(f"chosen:\n{example['text']}\nrejected:\n{example['rejected_text']}")


def _print_records(r: dict[str, Any]) -> None:
    skipped = f", {r['skipped']} bad records skipped" if r["skipped"] else ""
    print(f"records:    {r['records']}{skipped}")
    for message in r["skipped_first"]:
        print(f"  skipped:  {message}")
