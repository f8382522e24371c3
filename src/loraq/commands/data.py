"""`loraq data FILE`: how loraq reads a dataset, before any training.

Prints the format (detected or given), the number of records and examples,
token statistics with the share of tokens that carry loss, how many examples
``--seq-len`` truncates or drops, the padding share with and without
``--packing``, and ``--show N`` examples rendered as the model sees them with
the trained tokens between ``[[`` and ``]]``. It goes through the same
``build_data`` as ``loraq train``, so what it accepts, training accepts.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from loraq.config import FORMATS

OPEN, CLOSE = "[[", "]]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="dataset file (.jsonl, .json, .csv, .parquet)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: detected)")
    parser.add_argument("--model", default=None, help="model whose tokenizer and chat template to use "
                                                      "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seq-len", type=int, default=512, help="maximum tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch, for the padding share")
    parser.add_argument("--packing", action="store_true", help="pack several examples per sequence")
    parser.add_argument("--train-on-inputs", action="store_true", help="also train on prompt tokens")
    parser.add_argument("--skip-bad-examples", action="store_true", help="skip and count bad records instead of stopping")
    parser.add_argument("--show", type=int, default=1, metavar="N", help="rendered examples to show (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from loraq.config import TrainConfig
    from loraq.data.dataset import build_data
    from loraq.errors import ConfigError
    from loraq.models.load import load_tokenizer

    if args.show < 0:
        raise ConfigError(f"--show {args.show} must be 0 or more")
    cfg = TrainConfig.from_dict({"data": args.file, "format": args.format, "seq_len": args.seq_len,
                                 "batch_size": args.batch_size, "packing": args.packing,
                                 "train_on_inputs": args.train_on_inputs, "eval_samples": 0}, source="flags").validate()
    tokenizer = load_tokenizer(args.model)
    bundle = build_data(cfg, tokenizer, skip_bad=args.skip_bad_examples)
    report = summarize(bundle, given_format=args.format != "auto")
    shown = [{"where": e.where, "tokens": len(e), "trained": e.num_trained, "text": marked_text(tokenizer, e)}
             for e in bundle.train_examples[:args.show]]
    if args.json:
        print(json.dumps({**report, "examples_shown": shown}, indent=2))
        return 0
    print_report(report, shown)
    return 0


def summarize(bundle: Any, given_format: bool) -> dict[str, Any]:
    st = bundle.stats
    lengths = [len(e) for e in bundle.train_examples]
    return {
        "file": st.path, "format": st.format, "format_source": "given" if given_format else "detected",
        "records": st.train.records, "skipped": st.skipped, "skipped_first": st.skipped_messages[:3],
        "examples": st.train.examples, "truncated": st.train.truncated, "dropped": st.train.dropped,
        "seq_len": st.seq_len, "tokens": st.train.tokens, "trained_tokens": st.train.trained_tokens,
        "trained_share": st.train.trained_tokens / st.train.tokens if st.train.tokens else 0.0,
        "tokens_per_example": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
        "padding_fraction": st.train.padding_fraction, "padding_fraction_packed": st.train.padding_fraction_packed,
        "packed_rows": len(_packed_rows(bundle)),
    }


def _packed_rows(bundle: Any) -> list:
    from loraq.data.packing import pack

    return bundle.train if bundle.packed else pack(bundle.train_examples, bundle.seq_len)


def marked_text(tokenizer: Any, example: Any) -> str:
    """The example's text with each run of trained tokens between [[ and ]]."""
    pieces, run, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        is_trained = label != -100
        if trained is not None and is_trained != trained:
            pieces.append(_piece(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        pieces.append(_piece(tokenizer, run, bool(trained)))
    return "".join(pieces)


def _piece(tokenizer: Any, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids)
    return f"{OPEN}{text}{CLOSE}" if trained else text


def print_report(report: dict[str, Any], shown: list[dict[str, Any]]) -> None:
    r = report
    lengths = r["tokens_per_example"]
    print(f"file:       {r['file']}")
    print(f"format:     {r['format']} ({r['format_source']})")
    skipped = f", {r['skipped']} bad records skipped" if r["skipped"] else ""
    print(f"records:    {r['records']}{skipped}")
    for message in r["skipped_first"]:
        print(f"  skipped:  {message}")
    print(f"examples:   {r['examples']} ({r['truncated']} truncated, {r['dropped']} dropped with no trained "
          f"token left at --seq-len {r['seq_len']})")
    print(f"tokens:     {r['tokens']} total, {r['trained_tokens']} trained ({100 * r['trained_share']:.1f}%); "
          f"per example min {lengths['min']}, mean {lengths['mean']:.1f}, max {lengths['max']}")
    print(f"padding:    {100 * r['padding_fraction']:.1f}% without packing, "
          f"{100 * r['padding_fraction_packed']:.1f}% with --packing ({r['packed_rows']} packed rows)")
    for example in shown:
        print(f"\n--- {example['where']}: {example['tokens']} tokens, {example['trained']} trained "
              f"(between {OPEN} and {CLOSE}) ---")
        print(example["text"])
