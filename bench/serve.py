"""Serving throughput: `loraq serve` under concurrent clients over 8 adapters (issue 30), in one run.

    python bench/serve.py              # the default model's 4-bit base, 8 QLoRA adapters, 64 new tokens
    python bench/serve.py --notes      # and the results appended to bench/NOTES.md
    python bench/serve.py --smoke      # a tiny random model and 2 adapters, in this process

Setup, cached under ``<loraq cache>/bench/serve``: the demo's QLoRA adapter (bench/decode.py's, ``loraq train demo
--max-steps 60``) and 7 variants of it (its ``lora_B`` times 0.7 .. 1.3 plus seeded noise, the same training
record), so every adapter goes on the same 4-bit base.

The server runs in this process (``loraq.serve(port=0)``, 127.0.0.1); clients are threads, each request a
streamed ``/v1/chat/completions`` over loopback (httpx), greedy, exactly ``--new-tokens`` new tokens (vLLM's
``ignore_eos``). A client's latency runs from sending to the last chunk; its time to first token to the first
chunk with text. Measured:

* the same 16 requests (2 per adapter, different prompts) one at a time, then all at once: total output
  tokens/s, ratio (target >= 3x);
* the same 16 at once all on one adapter: mixed / one adapter (target >= 0.8);
* load levels 1, 4, 16, 32 clients, each sending ``--per-client`` requests back to back over the 8 adapters:
  tokens/s, time to first token and latency p50 / p99, the server's mean batch (rows per decode step);
* greedy outputs: every answer of the concurrent run equals the same request sent alone, and the first
  adapter's equals ``loraq.generate``'s.

No llama.cpp server here (node-llama-cpp is a library; llama.cpp's server would batch different adapters
separately in any case). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import smoke  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain why the sky is blue.",
           "List five fruits and their colours.", "What is the capital of France, and why is it famous?",
           "Give me three tips for learning to cook.", "Describe a cat to someone who has never seen one.",
           "How do airplanes stay in the air?", "Write a haiku about autumn."]


@dataclass
class Answer:
    text: str
    tokens: int
    first_token_s: float
    latency_s: float


def ask(url: str, model: str, prompt: str, new_tokens: int) -> Answer:
    """One streamed greedy chat completion of exactly ``new_tokens`` tokens, timed from the client."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    first, parts, tokens = None, [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - start
                    parts.append(piece)
    return Answer("".join(parts), tokens, first if first is not None else float("nan"), time.perf_counter() - start)


def run_load(url: str, jobs: list[tuple[str, str]], clients: int, new_tokens: int) -> tuple[list[Answer], float]:
    """``jobs`` (model, prompt) sent by ``clients`` threads, each taking the next job when its last one ends."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda job: ask(url, job[0], job[1], new_tokens), jobs))
    return answers, time.perf_counter() - start


def tokens_per_s(answers: list[Answer], seconds: float) -> float:
    return sum(a.tokens for a in answers) / seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------------------------- setup

def adapters(work: Path, count: int, steps: int) -> dict[str, Path]:
    """The demo QLoRA adapter and ``count - 1`` variants of it (see the module docstring), kept once written."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from decode import train_adapter

    first = train_adapter(work.parent / "decode" / f"135m-qlora-{steps}steps", "qlora", steps)
    made = {"tuned0": first}
    for k in range(1, count):
        folder = work / f"tuned{k}"
        if not (folder / "adapter_model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("adapter_config.json", "training_base.json"):
                shutil.copy(first / name, folder / name)
            g = torch.Generator().manual_seed(k)
            tensors = {key: (t * (0.7 + 0.6 * k / count) + 0.1 * t.std() * torch.randn(t.shape, generator=g)
                             if "lora_B" in key else t).to(t.dtype)
                       for key, t in load_file(str(first / "adapter_model.safetensors")).items()}
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        made[f"tuned{k}"] = folder
    return made


def smoke_adapters() -> dict[str, Path]:
    """Two random QLoRA adapters of the tiny model, with the record `loraq train` writes (a 4-bit base)."""
    from export_bench import random_adapter

    folder = smoke.temp_dir("loraq-smoke-serve-")
    return {f"tuned{k}": random_adapter(folder / f"tuned{k}", "qlora", str(smoke.tiny_model())) for k in range(2)}


# ----------------------------------------------------------------------------------------------- measuring

def mixed_jobs(names: list[str], count: int) -> list[tuple[str, str]]:
    return [(names[k % len(names)], PROMPTS[k % len(PROMPTS)]) for k in range(count)]


def throughput_lines(url: str, names: list[str], args: argparse.Namespace) -> list[str]:
    jobs = mixed_jobs(names, args.requests)
    alone = [ask(url, model, prompt, args.new_tokens) for model, prompt in jobs]
    alone_s = sum(a.latency_s for a in alone)
    together, together_s = run_load(url, jobs, len(jobs), args.new_tokens)
    one, one_s = run_load(url, [(names[0], p) for _, p in jobs], len(jobs), args.new_tokens)
    same = sum(a.text == b.text for a, b in zip(alone, together))
    seq, mixed, single = tokens_per_s(alone, alone_s), tokens_per_s(together, together_s), tokens_per_s(one, one_s)
    return ["", f"| {len(jobs)} requests over {len(names)} adapters, {args.new_tokens} new tokens each | seconds | "
                "output tok/s | ratio | issue 30 |", "|---|---|---|---|---|",
            f"| one at a time | {alone_s:.1f} | {seq:.1f} | 1.00 | |",
            f"| all at once, mixed adapters | {together_s:.1f} | {mixed:.1f} | {mixed / seq:.2f} x sequential | >= 3 |",
            f"| all at once, one adapter | {one_s:.1f} | {single:.1f} | mixed / one = {mixed / single:.2f} | "
            ">= 0.8 |", "",
            f"greedy answers of the concurrent run equal to the same request alone: {same} of {len(jobs)}"]


def load_lines(url: str, names: list[str], server, args: argparse.Namespace) -> list[str]:
    lines = ["", "| clients | requests | output tok/s | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | "
                 "mean batch |", "|---|---|---|---|---|---|---|---|"]
    for clients in args.levels:
        jobs = mixed_jobs(names, clients * args.per_client)
        steps, rows = server.metrics.decode_steps._value.get(), server.metrics.decode_rows._value.get()
        answers, seconds = run_load(url, jobs, clients, args.new_tokens)
        batch = (server.metrics.decode_rows._value.get() - rows) / max(1, server.metrics.decode_steps._value.get()
                                                                        - steps)
        first = [a.first_token_s for a in answers]
        latency = [a.latency_s for a in answers]
        lines.append(f"| {clients} | {len(jobs)} | {tokens_per_s(answers, seconds):.1f} | "
                     f"{statistics.median(first):.2f} | {percentile(first, 0.99):.2f} | "
                     f"{statistics.median(latency):.2f} | {percentile(latency, 0.99):.2f} | {batch:.1f} |")
    return lines


def generate_line(url: str, name: str, folder: Path, args: argparse.Namespace, model: str | None) -> str:
    import loraq

    served = ask(url, name, PROMPTS[0], args.new_tokens).text
    alone = loraq.generate(PROMPTS[0], model=model, adapter=str(folder), max_new_tokens=args.new_tokens,
                           say=lambda _m: None)
    same = served == alone or (served.startswith(alone) and len(alone) > 0)  # generate stops at EOS; serve did not
    return f"{name}'s greedy answer equals `loraq generate`'s: {'yes' if same else 'NO'}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="adapters served")
    parser.add_argument("--requests", type=int, default=16, help="requests of the throughput comparison")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32],
                        help="concurrent clients of the load levels")
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends at a load level")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--train-steps", type=int, default=60, help="steps of the demo adapter (the demo's: 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--notes", action="store_true", help="append the results to bench/NOTES.md")
    smoke.add_flag(parser, "2 random adapters, 2 requests of 3 tokens, levels 1 and 2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    import loraq
    from decode import machine
    from loraq.paths import cache_dir

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model = None
    if args.smoke:
        smoke.setup()
        args.requests, args.new_tokens, args.levels, args.per_client, args.notes = 2, 3, [1, 2], 1, False
        folders, model = smoke_adapters(), str(smoke.tiny_model())
    else:
        torch.set_num_threads(args.threads)
        folders = adapters(cache_dir() / "bench" / "serve", args.adapters, args.train_steps)
    names = list(folders)
    with loraq.serve(model=model, adapter={k: str(v) for k, v in folders.items()}, port=0,
                     max_batch=args.max_batch, max_queue=4 * args.max_batch, say=lambda _m: None) as server:
        info = machine()
        report = [f"{info['date']}: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
                  f"{info['threads']} threads; server: {server.served.base.name}, {len(names)} adapters, "
                  f"--max-batch {args.max_batch}"]
        report += throughput_lines(server.url, names, args)
        report += load_lines(server.url, names, server, args)
        report.append(generate_line(server.url, names[0], folders[names[0]], args, model))
    print("\n".join(report), flush=True)
    if args.notes:
        notes = HERE / "NOTES.md"
        notes.write_text(notes.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + "\n".join(
            [f"### Measured (`python bench/serve.py {' '.join(argv)}`)", "", *report]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
