"""`loraq chat`: an interactive, multi-turn conversation through the model's chat template.

Type a message and press Enter; `/reset` starts over, `/exit` (or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import sys

from loraq.api.loading import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message for the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def run(args: argparse.Namespace) -> int:
    from loraq.api.loading import load_from_args
    from loraq.models.generation import check_options, generate_text

    check_options(args.max_new_tokens, args.temperature, args.top_p)
    loaded = load_from_args(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.source.name}" + (f" + {args.adapter}" if args.adapter else "")
              + " (/reset to start over, /exit to leave)", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        if interactive:
            print("model> ", end="", flush=True, file=sys.stderr)
        reply = generate_text(loaded.model, loaded.tokenizer, messages, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=sys.stdout)
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0
