"""`loraq generate`: one reply to a prompt, streamed token by token (greedy unless --temperature)."""
from __future__ import annotations

import argparse
import sys

from loraq.api.loading import add_model_arguments, model_keywords


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the user message")
    add_decoding_arguments(parser)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --seed, --stop (for any command that generates)."""
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the reply before this text (repeatable)")


def decoding_keywords(args: argparse.Namespace) -> dict:
    """The API keyword arguments of the flags :func:`add_decoding_arguments` added."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": tuple(args.stop)}


def run(args: argparse.Namespace) -> int:
    from loraq.api.generate import generate

    generate(args.prompt, no_chat_template=args.no_chat_template, stream=sys.stdout, **decoding_keywords(args),
             **model_keywords(args))
    return 0
