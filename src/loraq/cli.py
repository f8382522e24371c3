"""The ``loraq`` command: a thin dispatcher over the Python API.

Each subcommand lives in ``loraq.commands.<name>`` and defines
``add_arguments(parser)`` and ``run(args) -> int``. This file holds no logic
the API lacks; it only turns user mistakes into one line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from loraq.errors import LoraqError

# name -> one-line help; the module is loraq.commands.<name>
COMMANDS = {
    "train": "fine-tune a model with QLoRA (default), LoRA or full fine-tuning",
    "quantize": "write a 4-bit (NF4/FP4) copy of a model in the bitsandbytes format",
    "export": "write a model (an adapter merged in, or the adapter alone) as a GGUF file "
              "for llama.cpp / Ollama / LM Studio",
    "merge": "merge an adapter into its base model and write a plain HF folder",
    "generate": "generate text from a prompt (optionally with an adapter)",
    "chat": "chat with a model interactively",
    "serve": "serve a base and its adapters over an OpenAI-compatible HTTP API (batched across adapters)",
    "eval": "loss, perplexity and exact-match accuracy on a dataset",
    "data": "inspect a dataset: detected format, token counts, masking, packing",
    "models": "list the models in loraq's cache",
    "plan": "predict a training run's peak memory (and the largest batch that fits) before loading anything",
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (argparse prints usage blocks)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise LoraqError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="loraq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=f"loraq.commands.{name}")
        # defer the heavy import: only the chosen command's module is imported
        p.set_defaults(_add_arguments_done=False)
    return parser


def _unrecognized(command: str, sub: argparse.ArgumentParser, extra: list[str]) -> str:
    """``unrecognized arguments: --lenght`` with the nearest flag of that command, if one is close."""
    import difflib

    flags = [o for action in sub._actions for o in action.option_strings if o.startswith("--")]
    hint = ""
    for arg in extra:
        close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.7) if arg.startswith("--") else []
        if close:
            hint = f"; did you mean {close[0]}?"
            break
    return f"loraq {command}: unrecognized arguments: {' '.join(extra)}{hint} (see `loraq {command} --help`)"


def _version() -> str:
    from loraq import __version__

    return f"loraq {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        # pass 1 finds the command; pass 2 parses its flags with its own arguments added
        command = next((a for a in argv if not a.startswith("-")), None)
        if command is None or command not in COMMANDS:
            if command is None and not argv:
                parser.print_help()
                return 0
            if command is None:
                parser.parse_args(argv)  # handles --help/--version, errors on junk
                return 0
            raise LoraqError(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
        module = importlib.import_module(f"loraq.commands.{command}")
        sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        module.add_arguments(sub)
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise LoraqError(_unrecognized(command, sub, extra))
        return int(module.run(args) or 0)
    except LoraqError as exc:
        print(f"loraq: error: {exc}", file=sys.stderr)
        if os.environ.get("LORAQ_ERROR_FILE"):
            from loraq.training.launch import record_error_for_launcher

            record_error_for_launcher(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print("loraq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `loraq ... | head` closing the pipe is not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
