"""Write a GGUF file one tensor at a time: the plan (name, shape, GGML type per tensor), then the bytes.

File layout (ggml's GGUF spec; the ``gguf`` package's ``GGUFWriter`` writes
it): header, metadata key-values, tensor infos (name, dims, type, offset),
then each tensor's data aligned to 32 bytes. The infos come before any data,
so the plan fixes every tensor's type and size first; then each tensor is
loaded (merged, dequantized), re-ordered for llama.cpp, converted to its
GGML type and written, and dropped before the next one: the peak memory is
one float32 tensor and its converted copy above the model's own.

Types, by ``--quant`` (1-D tensors -- norms, biases -- are always F32):

==========  =================================================================
f32/f16/bf16  every 2-D tensor in that type
q8_0        Q8_0 (blocks of 32: one f16 scale, 32 int8); F16 for a row length not divisible by 32
q4_0        Q4_0 (blocks of 32: one f16 scale, 32 4-bit codes); the output head (or the tied
            embedding, which is the head) Q8_0, as llama.cpp's quantizer keeps it at 6+ bits
q4_k_m      llama.cpp's Q4_K_M mix: Q4_K; Q6_K for the head, and for ``attn_v`` and
            ``ffn_down`` in the first and last eighth of the layers and every third layer
            between; ``attn_qkv`` Q6_K. A row length not divisible by 256 falls back to Q5_0
            (for Q4_K) or Q8_0 (for Q6_K), as llama.cpp's quantizer does.
==========  =================================================================

F16/BF16/Q8_0/Q4_0/Q5_0 come from the ``gguf`` package's quantizers (Q8_0 is
documented bit-exact with ggml's reference); Q4_K and Q6_K from
:mod:`loraq.exporting.kquants`.
"""
from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, LlamaFileType

from loraq import faults
from loraq.errors import ConfigError, OutputError
from loraq.exporting.gguf_arch import KV, Family, block_index, extra_tensors, gguf_tensor_name, prepare_tensor
from loraq.exporting.tensors import LazyTensor

FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
              "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
              "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M}
_PLAIN = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
_BLOCK = {T.Q8_0: 32, T.Q4_0: 32, T.Q5_0: 32, T.Q4_K: 256, T.Q6_K: 256}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0, T.Q5_0: T.F16, T.Q8_0: T.F16, T.Q4_0: T.F16}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its llama.cpp name, shape (rows first, as in torch), type and source."""

    name: str
    shape: tuple[int, ...]
    type: T
    load: Callable[[], torch.Tensor]


def plan_tensors(family: Family, config: Any, tensors: list[LazyTensor], quant: str) -> list[PlannedTensor]:
    """Every tensor of the file in order (embedding, blocks by number, output), with its GGML type."""
    named = {gguf_tensor_name(family, t.name): t for t in tensors}
    head = "output.weight" if "output.weight" in named else "token_embd.weight"
    plan = []
    for name, t in named.items():
        plan.append(PlannedTensor(name, t.shape, tensor_type(quant, name, t.shape, head, config.num_hidden_layers),
                                  t.load))
    for name, value in extra_tensors(config).items():
        plan.append(PlannedTensor(name, tuple(value.shape), T.F32, lambda v=value: v))
    return sorted(plan, key=_file_order)


def _file_order(t: PlannedTensor) -> tuple[int, int, str]:
    block = block_index(t.name)
    if block is not None:
        return (1, block, t.name)
    return (0 if t.name in ("token_embd.weight", "rope_freqs.weight") else 2, 0, t.name)


def tensor_type(quant: str, name: str, shape: tuple[int, ...], head: str, n_layers: int) -> T:
    """The GGML type of tensor ``name`` under ``--quant quant`` (see the module docstring)."""
    if len(shape) < 2:
        return T.F32
    if quant == "q4_k_m":
        wanted = _q4_k_m_type(name, head, n_layers)
    elif quant == "q4_0" and name == head:
        wanted = T.Q8_0
    else:
        wanted = _PLAIN[quant]
    while wanted in _BLOCK and shape[-1] % _BLOCK[wanted]:
        wanted = _FALLBACK[wanted]
    return wanted


def _q4_k_m_type(name: str, head: str, n_layers: int) -> T:
    if name == head or ".attn_qkv." in name:
        return T.Q6_K
    layer = block_index(name)
    if layer is not None and (".attn_v." in name or ".ffn_down." in name) and more_bits(layer, n_layers):
        return T.Q6_K
    return T.Q4_K


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's Q4_K_M rule for attn_v / ffn_down: the first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def convert(w: torch.Tensor, qtype: T) -> np.ndarray:
    """A float32 tensor as the bytes (or f32/f16 array) of GGML type ``qtype``."""
    from gguf import quants

    a = w.detach().to(torch.float32).contiguous().numpy()
    if qtype == T.F32:
        return a
    if qtype in (T.Q4_K, T.Q6_K):
        from loraq.exporting.kquants import quantize_k

        return quantize_k(a, qtype)
    return quants.quantize(a, qtype)


def nbytes(shape: tuple[int, ...], qtype: T) -> int:
    from gguf import quants

    return int(np.prod(quants.quant_shape_to_byte_shape(shape, qtype)))


def write_gguf(path: Path, arch: str, metadata: dict[str, KV], plan: list[PlannedTensor],
               prepare: Callable[[str, torch.Tensor], torch.Tensor], say: Callable[[str], None] | None = None) -> dict:
    """Write ``plan`` with ``metadata`` to ``path`` (its temporary sibling, renamed at the end); returns counts."""
    from loraq.paths import atomic_file

    path = Path(path)
    start = time.perf_counter()
    try:
        with atomic_file(path) as tmp:
            writer = GGUFWriter(tmp, arch)
            for key, kv in metadata.items():
                if key != "general.architecture":
                    writer.add_key_value(key, kv.value, kv.type, kv.sub_type)
            for t in plan:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.type), raw_dtype=t.type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_data(writer, plan, prepare, say)
            writer.close()
    except OSError as exc:
        raise OutputError(_write_error(path, exc)) from None
    return {"tensors": len(plan), "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - start, 2)}


def _write_data(writer: GGUFWriter, plan: list[PlannedTensor], prepare, say) -> None:
    for i, t in enumerate(plan):
        faults.point("gguf-tensor", writer.path)
        data = convert(prepare(t.name, t.load()), t.type)
        writer.write_tensor_data(data)
        del data
        if say is not None and (i + 1) % 50 == 0:
            say(f"  {i + 1}/{len(plan)} tensors written")
    writer.flush()


def _write_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"--out {path}: the disk filled while writing the GGUF; nothing was written, free space and rerun"
    return f"--out {path}: cannot write the GGUF ({exc.strerror or exc}); nothing was written"


def check_gguf_output(out: Path, overwrite: bool, inputs: list, modelfile: bool) -> None:
    """``out`` may be written: not a folder, not an input, replaced only with ``overwrite`` and only if it is a GGUF."""
    from loraq.exporting.modelfile import modelfile_path

    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the .gguf file to write")
    for given in inputs:
        if given is not None and Path(given).exists() and Path(given).resolve() == out.resolve():
            raise ConfigError(f"--out {out} is an input of this export; write to another file")
    for path in [out, modelfile_path(out)] if modelfile else [out]:
        if path.exists() and not overwrite:
            raise ConfigError(f"--out: {path} exists; pass --overwrite to replace it or choose another name")
    if out.exists() and not is_gguf(out):
        raise ConfigError(f"--overwrite: {out} is not a GGUF file; refusing to replace it, choose another --out")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def prepare_for(family: Family, config: Any) -> Callable[[str, torch.Tensor], torch.Tensor]:
    return lambda name, w: prepare_tensor(family, config, name, w)
