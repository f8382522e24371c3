"""`loraq serve`: one base, many adapters, an OpenAI-compatible server on 127.0.0.1 (Ctrl-C / SIGTERM stops it)."""
from __future__ import annotations

import argparse
import sys

from loraq.choices import COMPUTE_DTYPES, INFERENCE_QUANT
from loraq.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="the base: HF folder, hub id, .gguf file (default: the first adapter's base, else "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve the adapter folder PATH as model NAME (repeatable)")
    parser.add_argument("--adapters-dir", default=None, help="serve every adapter folder inside DIR, by folder name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--admin-key", default=None,
                        help="the key for /v1/load_lora_adapter and /v1/unload_lora_adapter (default: --api-key)")
    parser.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429s")
    parser.add_argument("--max-active-adapters", type=int, default=16,
                        help="adapters installed at once (the least recently used is evicted)")
    parser.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES, help="compute dtype")
    parser.add_argument("--quant", default="auto", choices=INFERENCE_QUANT,
                        help="the base's weights: auto = as the first adapter was trained, else full precision")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle weights (.bin/.pt: they can run code; only files you trust)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model folder's own Python code to run")


def named_adapters(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {value!r}: give NAME=PATH (e.g. --adapter tuned=runs/demo)")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    from loraq.api.serve import serve

    def say(message: str) -> None:
        print(f"loraq: {message}", file=sys.stderr, flush=True)

    server = serve(model=args.model, adapter=named_adapters(args.adapter), adapters_dir=args.adapters_dir,
                   host=args.host, port=args.port, api_key=args.api_key, admin_key=args.admin_key,
                   max_batch=args.max_batch, max_queue=args.max_queue, max_active_adapters=args.max_active_adapters,
                   dtype=args.dtype, quant=args.quant, allow_pickle=args.allow_pickle,
                   trust_remote_code=args.trust_remote_code, block=True, say=say)
    del server
    return 0
