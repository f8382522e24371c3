"""`loraq chat`: an interactive, multi-turn conversation through the model's chat template.

Type a message and press Enter; `/reset` starts over, `/exit` (or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import sys

from loraq.api.loading import add_model_arguments, model_keywords
from loraq.commands.generate import add_decoding_arguments, decoding_keywords


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message for the conversation")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loraq.api.generate import chat

    session = chat(system=args.system, **decoding_keywords(args), **model_keywords(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {session.loaded.source.name}" + (f" + {args.adapter}" if args.adapter else "")
              + " (/reset to start over, /exit to leave)", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
        elif text:
            if interactive:
                print("model> ", end="", flush=True, file=sys.stderr)
            session.reply(text, stream=sys.stdout)
    return 0
