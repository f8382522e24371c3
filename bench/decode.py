"""Decode speed: loraq's generation engine against llama.cpp (node-llama-cpp) on the same CPU, in one run (issue 29).

    python bench/decode.py                          # both shapes, 128 new tokens, 3 runs each (median)
    python bench/decode.py --shapes 135m --notes    # the default model only; the results appended to bench/NOTES.md
    python bench/decode.py --new-tokens 16 --runs 1 --em-runs 1 --train-steps 3   # a functional check
    python bench/decode.py --smoke                  # a tiny random model, in this process, no llama.cpp

Setup, cached under ``<loraq cache>/bench/decode`` (``LORAQ_CACHE``): for the default model (SmolLM2-135M) a QLoRA
and a ``--method lora`` adapter trained by ``loraq train demo --max-steps N`` (the demo's rank, targets and data;
no exact-match passes), and ``loraq export`` of the QLoRA adapter merged into a Q4_0 GGUF and of the LoRA one into
an F16 GGUF. For the 415m shape (hidden 1024, 24 layers, intermediate 2816, 16 heads / 4 KV heads, the default
model's tokenizer; random init, saved once as an HF folder) the adapters are random rank-16 ones on all linear
layers (``export_bench.random_adapter``: values do not change speed) and the GGUFs are the base alone (Q4_0, F16:
the same tensors a merged export has).

Measured, side by side, each as the median of ``--runs`` after one short warm-up:

* loraq, batch 1, greedy, exactly ``--new-tokens`` new tokens of a chat prompt (stop tokens end nothing), through
  ``loraq.generation.engine.generate_ids``: (a) the 4-bit base with the QLoRA adapter unmerged, (b) the 4-bit base
  alone, (c) the full-precision base with the LoRA adapter unmerged; and "today" for (a): transformers'
  ``generate`` with the 4-bit product kernels unregistered (as before issue 29).
  Prefill: prompt to first new token; decode: the other new tokens.
* llama.cpp (node-llama-cpp 3.21.1, ``--threads`` threads): the same prompt ids, the same count of new tokens,
  greedy, end-of-generation tokens banned, no repeat penalty (``timed`` in tests/export/llama_cpp_runner.mjs).
* exact match on the demo's 64 held-out prompts (one batch, ``loraq.training.evaluate.exact_match``) with the QLoRA
  model: the engine against transformers' ``generate`` (today's path, product kernels unregistered).
* a memory-bandwidth probe (a 1 GiB float32 sum, best of 5) and, per decode row, the weight bytes read per token
  (4-bit layers' packed codes and scales, adapters, norms, the head in full and one embedding row; for llama.cpp
  the GGUF's tensors the same way) times tokens/s, as a share of the probe.

llama.cpp's threads spin: run this alone on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "export"), str(HERE)]  # the llama.cpp runner the tests use; bench/smoke.py
import smoke  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
BIG_SHAPE = dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
TARGETS = {"a/q4_0": "target >= 0.5 (moonshot 1.0)", "c/f16": "target >= 0.5", "a/today": "target >= 3",
           "em": "target >= 5, same accuracy"}


@dataclass
class Timing:
    """One decode: the prompt's tokens up to the first new token (prefill), then the other new tokens (decode)."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 else float("nan")


def median_of(timings: list[Timing]) -> Timing:
    """Prefill and decode seconds each the median over the runs."""
    return Timing(timings[0].prompt_tokens, timings[0].new_tokens,
                  statistics.median(t.prefill_s for t in timings), statistics.median(t.decode_s for t in timings))


@dataclass
class Row:
    """One printed decode row: who, on what, its median timing and the weight bytes it reads per token."""

    key: str
    label: str
    timing: Timing
    bytes_per_token: int
    note: str = ""


@dataclass
class Shape:
    """A model to measure: its spec (None: the default), adapters, GGUFs (None: llama.cpp not run)."""

    name: str
    model: str | None
    qlora: Path
    lora: Path
    q4_0: Path | None = None
    f16: Path | None = None
    gguf_of: str = "the adapter merged"
    exact_match: bool = True
    prompt: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- the machine

def machine() -> dict:
    """CPU model name, core count and the ISA flags that matter here (lscpu, /proc/cpuinfo), torch and threads."""
    import torch

    name = platform.processor() or "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    name)
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        line = next((line for line in fh if line.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    return {"cpu": name, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def bandwidth_gbps(megabytes: int, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth as torch reaches it: a float32 tensor summed (read) and copied (read + write), best of
    ``repeats``, in GB/s."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    best = {"read": float("inf"), "copy": float("inf")}
    for _ in range(repeats + 1):  # the first of each is a warm-up (page faults)
        for kind, fn in (("read", x.sum), ("copy", lambda: y.copy_(x))):
            start = time.perf_counter()
            fn()
            best[kind] = min(best[kind], time.perf_counter() - start)
    return {"read": nbytes / best["read"] / 1e9, "copy": 2 * nbytes / best["copy"] / 1e9}


# ----------------------------------------------------------------------------------------------- setup

def work_dir() -> Path:
    from loraq.paths import cache_dir

    return cache_dir() / "bench" / "decode"


def train_adapter(folder: Path, method: str, steps: int) -> Path:
    """``loraq train demo --method M --max-steps N`` into ``folder`` (kept: a finished run is reused)."""
    if (folder / "summary.json").is_file() and (folder / "adapter_config.json").is_file():
        return folder
    cmd = [sys.executable, "-m", "loraq", "train", "demo", "--method", method, "--max-steps", str(steps),
           "--eval-samples", "0", "--output-dir", str(folder), "--overwrite"]
    print(f"setup: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def export_gguf(out: Path, quant: str, **source) -> Path:
    """``loraq.export(**source, quant=quant)`` into ``out`` (kept: an existing file is reused)."""
    import loraq

    if not out.is_file():
        flags = " ".join(f"--{k} {v}" for k, v in source.items())
        print(f"setup: loraq export {flags} --quant {quant} --out {out}", flush=True)
        loraq.export(**{k: str(v) for k, v in source.items()}, out=str(out), quant=quant, say=lambda _m: None)
    return out


def default_shape(work: Path, steps: int) -> Shape:
    """SmolLM2-135M with demo-trained adapters; the QLoRA one merged into Q4_0, the LoRA one into F16."""
    qlora = train_adapter(work / f"135m-qlora-{steps}steps", "qlora", steps)
    lora = train_adapter(work / f"135m-lora-{steps}steps", "lora", steps)
    return Shape("135m", None, qlora, lora, q4_0=export_gguf(work / f"135m-qlora-{steps}steps-q4_0.gguf", "q4_0",
                                                                adapter=qlora),
                 f16=export_gguf(work / f"135m-lora-{steps}steps-f16.gguf", "f16", adapter=lora))


def random_adapters(work: Path, model: str) -> tuple[Path, Path]:
    """Random rank-16 QLoRA and LoRA adapters on every linear layer of ``model`` (kept once written)."""
    from export_bench import random_adapter

    made = []
    for method in ("qlora", "lora"):
        folder = work / f"adapter-{method}"
        if not (folder / "adapter_config.json").is_file():
            random_adapter(folder, method, model)
        made.append(folder)
    return made[0], made[1]


def big_model(folder: Path) -> Path:
    """The 415m shape, random init (seed 0), bf16, with the default model's tokenizer: an HF folder, made once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from loraq.models.load import load_tokenizer
    from loraq.paths import atomic_dir

    tokenizer = load_tokenizer(None)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **BIG_SHAPE, **ids)).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    with atomic_dir(folder, replace=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return folder


def big_shape(work: Path) -> Shape:
    folder = big_model(work / "415m-model")
    qlora, lora = random_adapters(work / "415m", str(folder))
    return Shape("415m", str(folder), qlora, lora, gguf_of="the base", exact_match=False,
                 q4_0=export_gguf(work / "415m-q4_0.gguf", "q4_0", model=folder),
                 f16=export_gguf(work / "415m-f16.gguf", "f16", model=folder))


def smoke_shape() -> Shape:
    """The tiny random model with random adapters; a Q4_0 export (its bytes counted, llama.cpp not run)."""
    model = str(smoke.tiny_model())
    work = smoke.temp_dir("loraq-decode-smoke-")
    qlora, lora = random_adapters(work, model)
    export_gguf(work / "tiny-q4_0.gguf", "q4_0", model=model)
    return Shape("tiny", model, qlora, lora)


# ----------------------------------------------------------------------------------------------- loraq's side

def time_engine(model, prompt: list[int], new_tokens: int, pad_id: int) -> Timing:
    """loraq's engine, batch 1, greedy, exactly ``new_tokens`` (no stop ids); timed at each kept token."""
    from loraq.generation.engine import generate_ids
    from loraq.generation.sampling import Sampling

    stamps: list[float] = []
    start = time.perf_counter()
    done = generate_ids(model, [prompt], Sampling(max_new_tokens=new_tokens), stop_ids=[], pad_id=pad_id,
                        on_token=lambda _row, _token: stamps.append(time.perf_counter()))[0]
    return Timing(len(prompt), len(done.tokens), stamps[0] - start, stamps[-1] - stamps[0])


class _Stamps:
    """A transformers streamer that only notes when each ``put`` comes (the first one is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, _value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_transformers(model, prompt: list[int], new_tokens: int, pad_id: int) -> Timing:
    """transformers' ``generate``, batch 1, greedy, exactly ``new_tokens`` (``min_new_tokens``: no early end)."""
    import torch

    stamps = _Stamps()
    start = time.perf_counter()
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                         temperature=None, top_p=None, top_k=None, streamer=stamps)
    return Timing(len(prompt), out.shape[1] - len(prompt), stamps.times[1] - start, stamps.times[-1] - stamps.times[1])


@contextlib.contextmanager
def without_products():
    """The 4-bit layers as before issue 29 for the block: no product kernel registered (the dequantization fast
    paths stay), so every 4-bit product dequantizes its weight and calls ``F.linear``."""
    from loraq.quant import backends

    if not hasattr(backends, "products"):  # a loraq without the product registry: that already is today's path
        yield
        return
    dequantizers, products = backends.dequantizers(), backends.products()
    backends.clear()
    for name, fn in dequantizers:
        backends.register_dequantizer(name, fn)
    try:
        yield
    finally:
        for name, fn in products:
            backends.register_product(name, fn)


def repeated(measure, runs: int, warmup_tokens: int, new_tokens: int) -> Timing:
    """``measure(new_tokens)`` ``runs`` times after one warm-up of ``warmup_tokens``; the median."""
    measure(warmup_tokens)
    return median_of([measure(new_tokens) for _ in range(runs)])


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (4-bit layers' packed codes and their
    quantization state included), the input embedding as one row unless it is also the head."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for m in model.modules() if getattr(m, "quant_state", None) is not None
                for t in m.quant_state.tensors().values()]
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        total += size // t.shape[0] if t is embedding and not tied else size
    return total


def gguf_bytes_per_token(path: Path) -> int:
    """The same for a GGUF: all tensors, ``token_embd`` as one row when the file has a separate ``output``."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        embd = tensors["token_embd.weight"]
        total -= int(embd.n_bytes) - int(embd.n_bytes) // int(embd.shape[-1])
    return total


# ----------------------------------------------------------------------------------------------- the runs

VARIANTS = (("a", "4-bit base + QLoRA adapter, unmerged"), ("b", "4-bit base, no adapter"),
            ("c", "full-precision base + LoRA adapter, unmerged"))


def load_variant(shape: Shape, key: str, dtype: str):
    from loraq.api.loading import load_for_inference

    if key == "a":
        return load_for_inference(adapter=str(shape.qlora), dtype=dtype, say=lambda _m: None)
    if key == "b":
        return load_for_inference(model=shape.model, quant="nf4", dtype=dtype, say=lambda _m: None)
    return load_for_inference(adapter=str(shape.lora), dtype=dtype, say=lambda _m: None)


def measure_loraq(shape: Shape, args: argparse.Namespace, dtype: str) -> None:
    """Rows (a), (b), (c) and today's (a); exact match on the QLoRA model; one model in memory at a time."""
    for key, label in VARIANTS:
        measure_variant(shape, key, label, args, dtype)
        gc.collect()


def measure_variant(shape: Shape, key: str, label: str, args: argparse.Namespace, dtype: str) -> None:
    from loraq.data.prompts import pad_token_id, prompt_ids, stop_token_ids

    loaded = load_variant(shape, key, dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = shape.prompt = prompt_ids(tokenizer, messages=PROMPT)
    pad_id = pad_token_id(tokenizer, stop_token_ids(tokenizer, model.generation_config))
    size = weight_bytes_per_token(model)
    timing = repeated(lambda n: time_engine(model, prompt, n, pad_id), args.runs, args.warmup, args.new_tokens)
    shape.rows.append(Row(f"loraq-{key}", f"loraq ({key}) {label}, {dtype}", timing, size))
    if key == "a":
        with without_products():
            today = repeated(lambda n: time_transformers(model, prompt, n, pad_id), args.runs, args.warmup,
                             args.new_tokens)
        shape.rows.append(Row("today-a", f"today (a): transformers `generate`, no product kernel, {dtype}",
                              today, size))
        if shape.exact_match:
            shape.lines += exact_match_lines(model, tokenizer, args)
    if key == "c":
        params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        shape.lines.insert(0, f"{shape.name}: {params / 1e6:.0f} M parameters in the base")


def measure_llama_cpp(shape: Shape, args: argparse.Namespace) -> None:
    """The Q4_0 and F16 GGUFs in one node process: a warm-up, then ``--runs`` timed decodes each."""
    from llama_cpp_node import run_llama_cpp

    files = (("q4_0", "Q4_0", shape.q4_0), ("f16", "F16", shape.f16))
    counts = [args.warmup] + [args.new_tokens] * args.runs
    models = [{"path": str(path), "context": len(shape.prompt) + args.new_tokens + 16,
               "tasks": [{"kind": "timed", "tokens": shape.prompt, "new_tokens": n} for n in counts]}
              for _key, _name, path in files]
    results = run_llama_cpp(models, threads=args.threads, timeout_s=3600)
    for (key, name, path), runs in zip(files, results):
        timings = [Timing(len(shape.prompt), len(r["tokens"]), r["prefill_s"], r["decode_s"]) for r in runs[1:]]
        shape.rows.append(Row(f"llama-{key}", f"llama.cpp {name} GGUF ({shape.gguf_of}), {args.threads} threads",
                              median_of(timings), gguf_bytes_per_token(path)))


# ----------------------------------------------------------------------------------------------- exact match

def demo_references(tokenizer, limit: int):
    """The demo's held-out prompts with answers (the first ``limit`` of its eval file, as ``loraq train`` takes
    them) and the new-token budget training gives them."""
    from loraq.data.dataset import read_samples
    from loraq.data.demo import demo_paths
    from loraq.data.references import eval_references, max_answer_tokens

    _fmt, samples = read_samples(demo_paths()[1])
    references = eval_references(samples, tokenizer, limit)
    return references, max_answer_tokens(references, tokenizer)


def transformers_batch(model, prompts, max_new_tokens: int, pad_id: int, stop_token_ids) -> list[list[int]]:
    """Exact match's batch generation before the engine: one left-padded batch through transformers'
    ``generate``, greedy, a row ending at a stop token."""
    from loraq.generation.engine import left_padded

    ids, mask = left_padded(prompts, pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, eos_token_id=list(stop_token_ids), temperature=None, top_p=None,
                         top_k=None)
    return [row[ids.shape[1]:].tolist() for row in out]


def time_exact_match(model, tokenizer, references, max_new_tokens: int, runs: int, today: bool):
    """(median seconds, the last result) of ``exact_match``; ``today``: through :func:`transformers_batch`
    with no product kernel."""
    from unittest import mock

    from loraq.training import evaluate

    swap = mock.patch.object(evaluate, "generate_batch", transformers_batch) if today else contextlib.nullcontext()
    seconds = []
    with swap, without_products() if today else contextlib.nullcontext():
        for _ in range(runs):
            start = time.perf_counter()
            result = evaluate.exact_match(model, tokenizer, references, max_new_tokens)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def exact_match_lines(model, tokenizer, args: argparse.Namespace) -> list[str]:
    references, max_new_tokens = demo_references(tokenizer, args.em_prompts)
    max_new_tokens = min(max_new_tokens, args.em_max_new_tokens)
    engine_s, engine = time_exact_match(model, tokenizer, references, max_new_tokens, args.em_runs, today=False)
    today_s, today = time_exact_match(model, tokenizer, references, max_new_tokens, args.em_runs, today=True)
    differ = sum(a != b for a, b in zip(engine.predictions, today.predictions))
    return ["", f"| exact match, (a), {len(references)} demo prompts in one batch, <= {max_new_tokens} new tokens "
                f"(median of {args.em_runs}) | seconds | accuracy |", "|---|---|---|",
            f"| loraq engine | {engine_s:.2f} | {engine.accuracy:.1%} |",
            f"| today: transformers `generate`, no product kernel | {today_s:.2f} | {today.accuracy:.1%} |",
            f"| speedup (today / engine) | {today_s / engine_s:.2f} | {TARGETS['em']} |", "",
            f"predictions that differ between the two: {differ} of {len(references)}"]


# ----------------------------------------------------------------------------------------------- the report

RATIOS = (("a/q4_0", "loraq-a", "llama-q4_0", "loraq (a) / llama.cpp Q4_0"),
          ("c/f16", "loraq-c", "llama-f16", "loraq (c) / llama.cpp F16"),
          ("a/today", "loraq-a", "today-a", "loraq (a) / today (a)"))


def header(info: dict, bandwidth: dict[str, float], args: argparse.Namespace, dtype: str) -> list[str]:
    return [f"{info['date']}: {info['cpu']}, {info['cores']} cores, {' '.join(info['isa']) or 'no AVX2/AVX-512'}; "
            f"torch {info['torch']}, {info['threads']} torch threads, loraq compute dtype {dtype}; llama.cpp "
            f"(node-llama-cpp 3.21.1) {args.threads} threads",
            f"bandwidth probe: read {bandwidth['read']:.1f} GB/s ({args.probe_mb} MiB float32 sum, best of 5), "
            f"copy {bandwidth['copy']:.1f} GB/s (read + write)"]


def shape_report(shape: Shape, bandwidth: float, args: argparse.Namespace) -> list[str]:
    """The decode table, the ratios and the shape's other lines (exact match)."""
    rows = {r.key: r.timing for r in shape.rows}
    lines = ["", *shape.lines[:1],
             "", f"| {shape.name}: batch 1, greedy, {len(shape.prompt)} prompt tokens + {args.new_tokens} new "
             f"(median of {args.runs}) | prefill tok/s | decode tok/s | ms/token | weight MB/token | GB/s | "
             "share of the probe |", "|---|---|---|---|---|---|---|"]
    for row in shape.rows:
        t = row.timing
        rate = row.bytes_per_token * t.decode_tps / 1e9
        lines.append(f"| {row.label} | {t.prefill_tps:.0f} | {t.decode_tps:.1f} | {1000 / t.decode_tps:.1f} | "
                     f"{row.bytes_per_token / 1e6:.1f} | {rate:.1f} | {rate / bandwidth:.0%} |")
    lines += ["", "| ratio | decode | prefill | issue 29 (decode) |", "|---|---|---|---|"]
    for key, num, den, label in RATIOS:
        if num in rows and den in rows:
            lines.append(f"| {label} | {rows[num].decode_tps / rows[den].decode_tps:.2f} | "
                         f"{rows[num].prefill_tps / rows[den].prefill_tps:.2f} | {TARGETS[key]} |")
    return lines + shape.lines[1:]


def append_notes(report: list[str], argv: list[str]) -> None:
    """The report as a block at the end of bench/NOTES.md's decode section (its heading added if missing)."""
    notes = HERE / "NOTES.md"
    text = notes.read_text(encoding="utf-8")
    heading = "## decode (issue 29)"
    block = "\n".join(["", f"### Measured (`python bench/decode.py {' '.join(argv)}`)", "", *report, ""]) + "\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    end = len(text) if end < 0 else end + 1
    notes.write_text(text[:end].rstrip("\n") + "\n" + block + text[end:], encoding="utf-8")


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="135m,415m", help="comma-separated: 135m (the default model), 415m")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per decode")
    parser.add_argument("--runs", type=int, default=3, help="timed decodes per row (the median is printed)")
    parser.add_argument("--warmup", type=int, default=8, help="new tokens of the untimed warm-up decode per row")
    parser.add_argument("--em-runs", type=int, default=3, help="timed exact-match passes per path")
    parser.add_argument("--em-prompts", type=int, default=64, help="demo prompts in the exact-match batch")
    parser.add_argument("--em-max-new-tokens", type=int, default=10**6, help=argparse.SUPPRESS)
    parser.add_argument("--train-steps", type=int, default=60, help="steps of the demo adapters (the demo's: 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--dtype", default="auto", help="loraq's compute dtype: auto, bf16, fp32")
    parser.add_argument("--probe-mb", type=int, default=1024, help="MiB summed by the bandwidth probe")
    parser.add_argument("--no-llama-cpp", action="store_true", help="loraq's side only")
    parser.add_argument("--notes", action="store_true", help="append the results to bench/NOTES.md")
    smoke.add_flag(parser, "loraq's side only (random adapters, a Q4_0 export whose bytes are counted), "
                           "4 new tokens, 4 exact-match prompts; no training, no llama.cpp")
    return parser.parse_args(argv)


def smoke_args(args: argparse.Namespace) -> None:
    smoke.setup()
    args.new_tokens, args.runs, args.warmup, args.em_runs, args.em_prompts = 4, 1, 2, 1, 4
    args.em_max_new_tokens, args.probe_mb, args.no_llama_cpp, args.notes = 4, 16, True, False


def main(argv: list[str] | None = None) -> None:
    import torch

    from loraq.devices import dtype_name, resolve_dtype

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.smoke:
        smoke_args(args)
    else:
        torch.set_num_threads(args.threads)
    dtype = dtype_name(resolve_dtype(args.dtype, "cpu"))
    info, bandwidth = machine(), bandwidth_gbps(args.probe_mb)
    builders = {"135m": lambda: default_shape(work_dir(), args.train_steps), "415m": lambda: big_shape(work_dir())}
    shapes = [smoke_shape()] if args.smoke else [builders[name]() for name in args.shapes.split(",")]
    for shape in shapes:
        measure_loraq(shape, args, dtype)
        if shape.q4_0 is not None and not args.no_llama_cpp:
            measure_llama_cpp(shape, args)
    report = header(info, bandwidth, args, dtype)
    for shape in shapes:
        report += shape_report(shape, bandwidth["read"], args)
    print("\n".join(report), flush=True)
    if args.notes:
        append_notes(report, argv)


if __name__ == "__main__":
    main()
