"""Peak memory of loading a model for QLoRA (4-bit, tensor by tensor) vs in full precision.

Each load runs in a fresh subprocess: the child imports everything loading
needs, resets its peak-RSS counter (``/proc/self/clear_refs``; falling back to
the RSS after imports), loads, reads every weight once (a memory-mapped
weight counts only once it is read), and reports ``VmHWM - baseline``: the
extra resident memory the loaded model needed at its peak. The bound the issue sets
for QLoRA loading is ``1.2 * (quantized model size + largest tensor of the
checkpoint as stored)``.

    python bench/load_memory.py                 # the default model, --dtype auto
    python bench/load_memory.py --model DIR --dtype bf16
    python bench/load_memory.py --smoke         # a tiny random model, both loads in this process (bench/smoke.py)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

MB = 1e6


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS where the kernel allows; return the baseline in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def _quantized_bytes(model) -> int:
    """Bytes of the loaded model: parameters, buffers and 4-bit quant states, shared tensors once."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None:
            tensors += list(state.tensors().values())
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _largest_stored_tensor(folder) -> tuple[str, int]:
    from safetensors import safe_open

    from loraq.models.safety import weight_files

    best = ("", 0)
    for path in weight_files(folder).files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                size = n * {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "I32": 4}.get(sl.get_dtype(), 4)
                if size > best[1]:
                    best = (key, size)
    return best


def _touch(model) -> None:
    """Read every weight once: transformers may hand back tensors that are still unread pages of a
    memory-mapped file, which become resident only at the first forward pass; count them now."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            for chunk in t.reshape(-1).split(1 << 20):  # small pieces: no sizeable temporary
                chunk.sum()


def _warm_up_quantizer() -> None:
    """One small quantization first: torch's one-time buffers (thread pools, kernels) are not the load's memory."""
    import torch

    from loraq.models.lowmem import quantize_in_chunks

    quantize_in_chunks(torch.randn(1024, 1024), 64, "nf4", True, name="warm-up")


def child(method: str, model_spec: str | None, dtype: str) -> None:
    # everything loading imports, before the baseline
    from transformers import AutoModelForCausalLM  # noqa: F401

    import loraq.kernels
    import loraq.models.lowmem  # noqa: F401
    from loraq.devices import resolve_dtype
    from loraq.models.load import load_model
    from loraq.models.skeleton import build_skeleton
    from loraq.models.source import resolve_source

    source = resolve_source(model_spec)
    build_skeleton(source.path, resolve_dtype(dtype), False, "bench")  # imports the architecture's code (no weights)
    _warm_up_quantizer()
    loraq.kernels.install()  # load_model registers the fast paths first: their modules' imports are not the load's
    baseline = _reset_peak()
    loaded = load_model(source, method=method, dtype=dtype, device="cpu")
    _touch(loaded.model)
    peak = _status_kb("VmHWM") * 1024 - baseline
    key, largest = _largest_stored_tensor(source.path)
    print(json.dumps({"method": method, "dtype": str(loaded.dtype).replace("torch.", ""), "peak_bytes": peak,
                      "model_bytes": _quantized_bytes(loaded.model), "largest_key": key, "largest_bytes": largest,
                      "source": str(source.path)}))


def run_child(method: str, model_spec: str | None, dtype: str, in_process: bool = False) -> dict:
    """One load in a fresh process (``in_process``, a smoke run: in this one)."""
    cmd = ([sys.executable, __file__, "--child", method, "--dtype", dtype]
           + (["--model", model_spec] if model_spec else []))
    if in_process:
        return json.loads(smoke.run_command(cmd, capture_stdout=True)[2].strip().splitlines()[-1])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model to load (default: the default model)")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp16, fp32")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    smoke.add_flag(parser, "both loads in this process, not fresh ones")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.dtype)
        return
    if args.smoke:
        smoke.setup()
        args.model = str(smoke.tiny_model())

    import torch

    qlora = run_child("qlora", args.model, args.dtype, in_process=args.smoke)
    full = run_child("lora", args.model, args.dtype, in_process=args.smoke)
    bound = 1.2 * (qlora["model_bytes"] + qlora["largest_bytes"])
    print(f"# load_memory  {datetime.date.today()}  {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f"{'  -- SMOKE RUN, not a measurement' if args.smoke else ''}")
    print(f"# model {qlora['source']}  compute dtype {qlora['dtype']}")
    print(f"{'load':<28}{'peak RSS above baseline':>26}{'model in memory':>18}")
    print(f"{'QLoRA (nf4+DQ, lowmem)':<28}{qlora['peak_bytes'] / MB:>23.1f} MB{qlora['model_bytes'] / MB:>15.1f} MB")
    print(f"{'full precision (lora)':<28}{full['peak_bytes'] / MB:>23.1f} MB{full['model_bytes'] / MB:>15.1f} MB")
    print(f"bound for QLoRA = 1.2 x (quantized {qlora['model_bytes'] / MB:.1f} MB + largest tensor "
          f"{qlora['largest_key']} {qlora['largest_bytes'] / MB:.1f} MB) = {bound / MB:.1f} MB")
    verdict = "within" if qlora["peak_bytes"] <= bound else "OVER"
    print(f"QLoRA peak {qlora['peak_bytes'] / MB:.1f} MB: {verdict} the bound; full-precision peak / QLoRA peak = "
          f"{full['peak_bytes'] / max(qlora['peak_bytes'], 1):.2f}")


if __name__ == "__main__":
    main()
