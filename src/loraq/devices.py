"""Devices and compute dtypes.

``--dtype auto`` picks bf16 where the hardware computes it natively -- CUDA
devices with bf16 support, CPUs with AVX-512 BF16 or AMX -- and fp32 elsewhere.
"""
from __future__ import annotations

import functools

import torch

from loraq.errors import ConfigError

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
               "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX-BF16, read from /proc/cpuinfo (Linux) or torch's own probe."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    try:  # torch >= 2.1 exposes mkldnn's own check
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_dtype(name: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.float32
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ConfigError(f"--dtype {name!r} is not one of: auto, bf16, fp16, fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return names.get(dtype, str(dtype).replace("torch.", ""))
