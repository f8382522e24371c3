"""GGUF export of the default model: time and peak memory per quant type, and each file's perplexity in llama.cpp.

    python bench/export_bench.py                   # f16 bf16 q8_0 q4_0 q4_k_m, 8 x 512 tokens of perplexity
    python bench/export_bench.py --quants q8_0 --windows 2 --no-adapter   # a quick check
    python bench/export_bench.py --smoke           # a tiny random model, q8_0, in this process, no llama.cpp

For each ``--quant`` one fresh process runs ``loraq.export(model=<default>)``
(the folder path: tensors read one at a time from the safetensors) and
reports its wall time, its peak RSS and its RSS after imports (the baseline:
Python, torch, transformers). With an adapter (a random rank-16 adapter on
all linear layers, recorded as QLoRA- or LoRA-trained) the merged export is
measured too: for QLoRA the 4-bit base is held in memory and each layer
dequantized and merged when written; for LoRA the base's files are streamed
and the update added per tensor.

Perplexity: the text of ``bench/quant_bench.py`` (``pydoc_data.topics``), cut
into ``--windows`` rows of 512 tokens, each row evaluated from an empty
context; llama.cpp (node-llama-cpp) gives the probability of every next token.
The same rows through transformers in fp32 are the reference.

llama.cpp's threads spin: run this alone on the machine (here: under
``flock /work/locks/heavy``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests" / "export"), str(HERE)]  # the llama.cpp runner the tests use; bench/smoke.py
import smoke  # noqa: E402

CHILD = f"import sys; sys.path.insert(0, {str(HERE)!r}); import export_bench; export_bench.child(sys.argv[1])"


def status(key: str) -> int:
    """VmRSS / VmHWM in bytes: this process's (ru_maxrss would include the parent's peak from before exec)."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def child(kwargs: str) -> None:
    """One export (``loraq.export(**json.loads(kwargs))``), measured; prints its JSON line."""
    # imports first: the baseline
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import loraq
    import loraq.api.export  # noqa: F401
    import loraq.exporting.gguf  # noqa: F401

    baseline = status("VmRSS")
    start = time.perf_counter()
    report = loraq.export(**json.loads(kwargs), say=lambda _m: None)
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    print(json.dumps({"seconds": seconds, "peak": peak, "baseline": baseline, "bytes": report["bytes"],
                      "types": report.get("types")}))


def export_once(kwargs: dict, in_process: bool = False) -> dict:
    """:func:`child` in a fresh process (``in_process``, a smoke run: in this one)."""
    if in_process:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            child(json.dumps(kwargs))
        return json.loads(out.getvalue().strip().splitlines()[-1])
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kwargs)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def random_adapter(folder: Path, method: str, model: str | None = None) -> Path:
    """A rank-16 adapter on all linear layers (B random, as after training) with the record ``loraq train`` writes."""
    import torch
    from export_helpers import save_adapter_as_trained

    from loraq.lora.config import LoraConfig
    from loraq.lora.model import inject_lora
    from loraq.models.load import load_model

    loaded = load_model(model, method=method, device="cpu")
    inject_lora(loaded.model, LoraConfig(r=16, alpha=32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return save_adapter_as_trained(loaded.model, folder, model, method)


def text_windows(windows: int, seq_len: int, model: str | None = None) -> list[list[int]]:
    from pydoc_data.topics import topics

    from loraq.models.load import load_tokenizer

    ids = load_tokenizer(model)("\n\n".join(topics.values()))["input_ids"]
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(windows)]


def transformers_perplexity(rows: list[list[int]], model_spec: str | None = None) -> float:
    import torch

    from loraq.models.load import load_model

    model = load_model(model_spec, method="lora", dtype="fp32", device="cpu").model
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss.item() for r in rows]
    return math.exp(sum(losses) / len(losses))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", default="f16,bf16,q8_0,q4_0,q4_k_m", help="comma-separated GGUF quant types")
    parser.add_argument("--windows", type=int, default=8, help="rows of text whose perplexity is measured")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--no-adapter", action="store_true", help="skip the merged-adapter export")
    parser.add_argument("--no-perplexity", action="store_true", help="time and memory only (no llama.cpp)")
    smoke.add_flag(parser, "loraq's side only: the exports in this process, transformers' perplexity, no llama.cpp")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = None  # the default model
    if args.smoke:  # a tiny random model, q8_0, 2 rows of 64 tokens; llama.cpp is not run
        smoke.setup()
        model, args.quants, args.windows, args.seq_len = str(smoke.tiny_model()), "q8_0", 2, 64
        args.no_perplexity = True
    tmp = smoke.temp_dir("loraq-export-bench-") if args.smoke else Path(tempfile.mkdtemp(prefix="loraq-export-bench-"))
    rows = text_windows(args.windows, args.seq_len, model)
    print("| export | quant | file MB | seconds | peak RSS MB | above baseline MB | "
          f"perplexity in llama.cpp ({args.windows} x {args.seq_len}) |")
    print("|---|---|---|---|---|---|---|")
    base = {} if model is None else {"model": model}
    runs = [(f"--model ({model or 'default'})", q, {**base, "quant": q}) for q in args.quants.split(",")]
    if not args.no_adapter:
        for method, how in (("qlora", "the 4-bit base in memory"), ("lora", "the base's files streamed")):
            adapter = str(random_adapter(tmp / f"adapter-{method}", method, model))
            runs.append((f"--adapter ({method}, r=16; {how})", "q8_0", {"quant": "q8_0", "adapter": adapter}))
    for i, (label, quant, kwargs) in enumerate(runs):
        out = tmp / f"{i}-{quant}.gguf"
        m = export_once({**kwargs, "out": str(out)}, in_process=args.smoke)
        ppl = "-" if args.no_perplexity else f"{llama_cpp_perplexity(out, rows, args.threads):.2f}"
        print(f"| {label} | {quant} | {m['bytes'] / 1e6:.1f} | {m['seconds']:.1f} | {m['peak'] / 1e6:.0f} | "
              f"{(m['peak'] - m['baseline']) / 1e6:.0f} | {ppl} |", flush=True)
        out.unlink()
        out.with_suffix(".Modelfile").unlink()
    if args.smoke:
        print(f"\ntransformers, fp32, the same rows: perplexity {transformers_perplexity(rows, model):.2f} "
              "(smoke run: llama.cpp not run)")
    elif not args.no_perplexity:
        print(f"\ntransformers, fp32, the same rows: perplexity {transformers_perplexity(rows):.2f}")


def llama_cpp_perplexity(path: Path, rows: list[list[int]], threads: int) -> float:
    from llama_cpp_node import run_llama_cpp

    tasks = [{"kind": "nll", "tokens": r} for r in rows]
    results = run_llama_cpp([{"path": str(path), "context": len(rows[0]) + 8, "tasks": tasks}], threads=threads,
                            timeout_s=3600)[0]
    return math.exp(sum(r["nll"] for r in results) / sum(r["count"] for r in results))


if __name__ == "__main__":
    main()
