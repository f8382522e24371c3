"""One reused buffer for a weight dequantized only for the length of one product.

A 4-bit layer in training dequantizes its weight twice a step (``x W^T`` in
forward, ``g W`` in backward) and drops it right after the product. On the
CPU each of those is a fresh allocation of 2-25 MB, two per layer per step,
interleaved with the activations autograd keeps; glibc serves them from its
heap (after the first such block is freed, its dynamic mmap threshold rises
above them) and the holes they leave between kept activations are not
reused, so resident memory grows far above the live bytes (0.5 B Llama,
qlora 8 x 128: 3.67 GB RSS for 2.34 GB live; ``bench/NOTES.md``).

:func:`buffer` hands out one flat buffer per thread, dtype, device and
inference mode, grown to the largest weight asked for and then reused for
every layer, so the step's dequantized weights cost one allocation for the
whole run. The contract for a caller: the view it gets is valid until the
next :func:`buffer` call on the same thread, so it may only feed a product
that finishes first and must never be saved (for autograd or otherwise).
CUDA keeps its own allocator (it reuses same-sized blocks already): None there.
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()


def buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A contiguous 1-D view of ``numel`` elements of the calling thread's buffer for (dtype, device, inference
    mode), or None off the CPU; its contents are whatever was written last."""
    if device.type != "cpu":
        return None
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (dtype, device, torch.is_inference_mode_enabled())  # an inference tensor is not writable outside it
    held = buffers.get(key)
    if held is None or held.numel() < numel:
        buffers.pop(key, None)  # freed before the larger one is taken
        held = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return held[:numel]

