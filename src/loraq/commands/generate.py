"""`loraq generate`: one reply to a prompt, streamed token by token (greedy unless --temperature)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF folder, hub id, .gguf file or pre-quantized folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format) to apply to --model")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="compute dtype")
    parser.add_argument("--quant", default="none", choices=("none", "nf4", "fp4"),
                        help="load the base model in 4-bit, as QLoRA trains it (default: full precision)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle weights (only files you trust)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code to run")


def run(args: argparse.Namespace) -> int:
    from loraq.models.generation import check_options, generate_text
    from loraq.models.load import load_model
    from loraq.models.source import resolve_source

    check_options(args.max_new_tokens, args.temperature, args.top_p)
    source = resolve_source(args.model, allow_pickle=args.allow_pickle)
    method = "qlora" if args.quant != "none" or source.quantized else "lora"
    loaded = load_model(source, method=method, dtype=args.dtype, quant=args.quant if args.quant != "none" else "nf4",
                        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        from loraq.lora.files import load_adapter

        load_adapter(loaded.model, args.adapter, allow_pickle=args.allow_pickle)
    generate_text(loaded.model, loaded.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  chat_template=not args.no_chat_template, stream=sys.stdout)
    return 0

