"""The layout of loraq's model cache, and what ``loraq models`` lists.

::

    <cache>/models/<name>/        the default model (and other fetched models)
    <cache>/gguf/<stem>-<key>/    GGUF files converted once to safetensors

Each folder is written under a temporary sibling name and renamed into place
(:func:`loraq.paths.atomic_dir`); a marker file written last inside it,
:data:`MARKER`, says where it came from. A folder without the marker is never
loaded: a killed writer leaves at worst a stale temporary folder, which the
next writer (holding the lock) removes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loraq.paths import cache_dir

MARKER = "loraq-source.json"


def models_dir() -> Path:
    return cache_dir() / "models"


def gguf_dir() -> Path:
    return cache_dir() / "gguf"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def write_marker(folder: Path, **info: Any) -> None:
    """Write the marker into a folder being built (call it last, inside ``atomic_dir``)."""
    (Path(folder) / MARKER).write_text(json.dumps(info, sort_keys=True) + "\n", encoding="utf-8")


def read_marker(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove what a killed writer of ``final`` left behind (call it holding ``final``'s lock)."""
    removed = []
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def cached_models() -> list[dict[str, Any]]:
    """One row per complete folder in the cache (name, kind, path, bytes, source), then the 4-bit layers kept
    by :mod:`loraq.models.quantized_cache`."""
    from loraq.models.quantized_cache import entries
    rows = []
    for kind, root in (("model", models_dir()), ("gguf", gguf_dir())):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not is_complete(folder):
                continue
            marker = read_marker(folder)
            rows.append({"name": folder.name, "kind": kind, "path": str(folder), "bytes": folder_bytes(folder),
                         "source": marker.get("source", "?")})
    return rows + entries()
