"""A fingerprint of a model's weights: notices a different model behind the same name, in milliseconds.

Hashing every byte of a 7B checkpoint takes tens of seconds; this hashes what
tells models apart without reading them whole. For each safetensors file of
the folder (sorted by name): the tensor names, dtypes and shapes (its header),
and for every tensor up to three samples of ``SAMPLE_BYTES`` of its data (the
start, the middle and the end). A fine-tuned or merged copy of a model changes
the values of every weight it touches, so it changes the samples of those
tensors; a re-save in another dtype changes the header. Two folders with the
same fingerprint hold the same tensor layout and the same sampled bytes.

    fingerprint = "sampled-sha256:" + sha256(for each file, tensor: name, dtype, shape, samples)
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from loraq.errors import ModelError

SCHEME = "sampled-sha256"
SAMPLE_BYTES = 4096


def weights_fingerprint(files: list[Path] | tuple[Path, ...]) -> str:
    """The fingerprint of these safetensors files (see the module docstring)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: Path(p).name):
        _hash_file(Path(path), digest)
    return f"{SCHEME}:{digest.hexdigest()[:32]}"


def _hash_file(path: Path, digest) -> None:
    try:
        with open(path, "rb") as f:
            header, data_start = read_header(f)
            for name in sorted(k for k in header if k != "__metadata__"):
                info = header[name]
                begin, end = info["data_offsets"]
                digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
                for offset, length in _samples(begin, end):
                    f.seek(data_start + offset)
                    digest.update(f.read(length))
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc}); the model folder is damaged") from None


def file_header(path: Path) -> dict:
    """The header of the safetensors file ``path``; a ModelError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            header, _ = read_header(f)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc}); the model folder is damaged") from None


def read_header(f) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets) and where its data starts."""
    (header_len,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(header_len)), 8 + header_len


def _samples(begin: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes hashed for a tensor stored at ``[begin, end)``: all of a small one."""
    size = end - begin
    if size <= 3 * SAMPLE_BYTES:
        return [(begin, size)]
    middle = begin + size // 2 - (size // 2) % SAMPLE_BYTES
    return [(begin, SAMPLE_BYTES), (middle, SAMPLE_BYTES), (end - SAMPLE_BYTES, SAMPLE_BYTES)]
