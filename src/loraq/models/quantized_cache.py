"""The 4-bit base of a model, kept on disk so the next run does not quantize it again.

Quantizing is a pure function of the stored weights and the settings, and on
a CPU it is most of a QLoRA start (135 M parameters: ~1.2 s of the ~6 s before
the first step; a 7 B model: about a minute), paid again by every run, every
``--resume``, every ``loraq eval --quant``. So the first low-memory 4-bit load
of a model (:func:`loraq.models.lowmem.load_quantized`) writes its quantized
layers to ::

    <cache>/quantized/<key>.safetensors

and the next load with the same key reads them instead of the full-precision
weights of those layers. The file holds, for each quantized layer ``X``, the
packed codes and quant-state tensors bitsandbytes stores
(``X.weight``, ``X.weight.absmax``, ...; :mod:`loraq.quant.state_io`): the
same bytes :func:`~loraq.quant.functional.quantize_4bit` returns, so a cached
load is bit for bit a fresh one. Everything else (embeddings, norms, the head,
biases) is still read from the model's own files.

``key = sha256(weights fingerprint, quant_type, double_quant, blocksize, the
quantized layers' names, FORMAT)``, the fingerprint being
:func:`loraq.models.fingerprint.weights_fingerprint` (headers and sampled
bytes of every tensor: milliseconds, and it tells a changed checkpoint apart).

* Written atomically (temporary file, fsync, rename): a killed writer leaves no
  entry; an entry that cannot be read, or lacks a layer, is ignored (and
  replaced by the next load).
* Models under :data:`MIN_PARAMS` quantized parameters are not cached
  (quantizing them is as fast as reading them), and at most :data:`KEEP`
  entries are kept, the least recently used removed first.
* ``LORAQ_QUANT_CACHE=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from loraq.errors import LoraqError
from loraq.paths import atomic_file, cache_dir
from loraq.quant.linear import Linear4bit

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what quantize_4bit stores changes
MIN_PARAMS = 20_000_000
KEEP = 3


def enabled(quantized_params: int) -> bool:
    return os.environ.get("LORAQ_QUANT_CACHE", "1") != "0" and quantized_params >= MIN_PARAMS


def quantized_dir() -> Path:
    return cache_dir() / "quantized"


def cache_key(weight_paths: list[Path], layers: list[str], quant_type: str, double_quant: bool,
              blocksize: int) -> str:
    from loraq.models.fingerprint import weights_fingerprint

    parts = [FORMAT, weights_fingerprint(weight_paths), quant_type, double_quant, blocksize, sorted(layers)]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:32]


def read_layers(key: str, layers: list[str], compute_dtype: torch.dtype) -> dict[str, Linear4bit] | None:
    """The cached 4-bit layers of ``key`` (no bias: that comes from the model's files), or None when there is
    no complete, readable entry."""
    from safetensors import SafetensorError, safe_open

    from loraq.quant.bnb_format import linear4bit_from_bnb_tensors

    path = quantized_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            out = {}
            for layer in layers:
                tensors = {k: f.get_tensor(k) for k in names if k.startswith(layer + ".weight")}
                out[layer] = linear4bit_from_bnb_tensors(layer, tensors, compute_dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, LoraqError) as exc:
        log.warning("ignoring the cached 4-bit weights %s (%s); quantizing again", path, exc)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # used now: the last to be evicted
    return out


def write_layers(key: str, layers: Mapping[str, Linear4bit], source: str) -> Path | None:
    """Keep ``layers`` (name -> 4-bit layer) of the model ``source`` under ``key``; None when the cache cannot be
    written (a warning: the run goes on without it)."""
    from safetensors.torch import save_file

    from loraq.quant.state_io import state_to_tensors

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.weight"] = layer.weight.detach().to("cpu").contiguous()
        for suffix, value in state_to_tensors(layer.quant_state).items():
            tensors[f"{name}.weight.{suffix}"] = value.to("cpu").contiguous()
    path = quantized_dir() / f"{key}.safetensors"
    try:
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "loraq-quantized", "version": str(FORMAT),
                                                   "source": source})
        _evict(keep=path)
    except OSError as exc:
        log.warning("could not keep the 4-bit weights in %s (%s)", path.parent, exc)
        return None
    return path


def entries() -> list[dict]:
    """One row per cached model (as :func:`loraq.models.cache.cached_models` lists them), newest use first."""
    from safetensors import SafetensorError, safe_open

    rows = []
    folder = quantized_dir()
    for path in sorted(folder.glob("*.safetensors") if folder.is_dir() else [], key=lambda p: -p.stat().st_mtime):
        try:
            with safe_open(str(path), framework="pt") as f:
                source = (f.metadata() or {}).get("source", "?")
        except (OSError, SafetensorError):
            continue
        rows.append({"name": path.stem, "kind": "4-bit", "path": str(path), "bytes": path.stat().st_size,
                     "source": source})
    return rows


def _evict(keep: Path) -> None:
    """Remove the least recently used entries beyond :data:`KEEP` (never ``keep``)."""
    kept = sorted(quantized_dir().glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in kept if p != keep][KEEP - 1:]:
        with contextlib.suppress(OSError):
            old.unlink()
