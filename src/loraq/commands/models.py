"""`loraq models`: what is in loraq's model cache (fetched models, converted GGUF files, kept 4-bit layers)."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from loraq.models.cache import cached_models
    from loraq.paths import cache_dir

    rows = cached_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models cached in {cache_dir()} (the default model is fetched on first use)")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<5}  {r['bytes'] / 1e6:8.1f} MB  {r['source']:<20}  {r['path']}")
    return 0
