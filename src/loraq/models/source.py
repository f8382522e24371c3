"""Where a model comes from: turn ``--model SPEC`` into a local folder to load.

``resolve_source(spec)`` decides, without loading any weights:

* ``None``                      -> ``default``: SmolLM2-135M-Instruct, fetched once
  into loraq's cache (:func:`loraq.models.default.ensure_default_model`);
* an existing folder            -> ``dir`` (a Hugging Face folder), or ``bnb4bit``
  when its ``config.json`` carries a bitsandbytes 4-bit ``quantization_config``;
* an existing ``.gguf`` file    -> ``gguf``: converted once into a safetensors
  folder in the cache (:mod:`loraq.models.gguf`), then loaded like a folder;
* ``org/name`` (or ``org/name@revision``) that is not a local path -> ``hub``:
  downloaded through huggingface_hub into its own cache (:mod:`loraq.models.hub`).

Every problem a user can cause (a missing path, a folder that is not a model,
an adapter folder passed as a model, an unsupported file, an unreachable hub)
is one :class:`~loraq.errors.ModelError` line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraq.errors import ModelError

KINDS = ("default", "dir", "bnb4bit", "gguf", "hub")

# a hub repo id: "org/name", optionally "@revision"; never starts like a path
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")

_UNSUPPORTED_FILES = {
    ".safetensors": "pass the folder that holds it (with config.json and the tokenizer), not the weight file",
    ".bin": "pass the folder that holds it (with config.json), not the weight file",
    ".pt": "pass the folder that holds it (with config.json), not the weight file",
    ".pth": "pass the folder that holds it (with config.json), not the weight file",
    ".ggml": "old GGML files are not supported; use a .gguf file or a Hugging Face folder",
}


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder.

    ``kind`` is one of :data:`KINDS`; ``path`` is the Hugging Face folder to load
    (for ``gguf`` the converted folder in the cache, for ``hub`` the snapshot);
    ``name`` is what to call it in messages and adapter configs (the hub id,
    the folder or file name); ``origin`` is what the user passed (the ``.gguf``
    file, the hub id) or None for the default model.
    """

    kind: str
    path: Path
    name: str
    origin: str | None = None

    @property
    def quantized(self) -> bool:
        return self.kind == "bnb4bit"


def resolve_source(spec: str | Path | None, *, allow_pickle: bool = False) -> ModelSource:
    """Resolve ``--model SPEC`` (None: the default model) to a :class:`ModelSource`.

    ``allow_pickle`` only widens what a hub download fetches (``*.bin`` files).
    """
    if spec is None or str(spec).strip() == "":
        from loraq.models.default import DEFAULT_MODEL_NAME, ensure_default_model

        return ModelSource("default", ensure_default_model(), DEFAULT_MODEL_NAME, None)
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_source(path.resolve(), origin=text)
    if path.is_file():
        return _file_source(path.resolve(), origin=text)
    if path.exists():
        raise ModelError(f"--model {text}: not a folder or a .gguf file")
    match = _HUB_ID.match(text)
    if match and not text.startswith((".", "~")):
        from loraq.models.hub import download_snapshot

        folder = download_snapshot(match["repo"], revision=match["revision"], allow_pickle=allow_pickle)
        source = _folder_source(folder, origin=text)
        return ModelSource("bnb4bit" if source.kind == "bnb4bit" else "hub", folder, match["repo"], text)
    raise ModelError(
        f"--model {text}: no such file or folder (pass a Hugging Face folder, a .gguf file or a hub id like org/name)"
    )


def _file_source(path: Path, origin: str) -> ModelSource:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from loraq.models.gguf import converted_folder

        return ModelSource("gguf", converted_folder(path), path.stem, str(path))
    hint = _UNSUPPORTED_FILES.get(suffix, "pass a Hugging Face model folder, a .gguf file or a hub id")
    raise ModelError(f"--model {origin}: unsupported model file ({suffix or 'no extension'}); {hint}")


def _folder_source(folder: Path, origin: str) -> ModelSource:
    config = read_config(folder, origin)
    kind = "bnb4bit" if _quantization_kind(config, origin) == "bnb4bit" else "dir"
    return ModelSource(kind, folder, folder.name, origin)


def read_config(folder: Path, origin: str | None = None) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict; a ModelError when it is absent or unreadable."""
    label = origin or str(folder)
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        if (Path(folder) / "adapter_config.json").is_file():
            raise ModelError(
                f"--model {label}: this is a LoRA adapter folder, not a model; pass it with --adapter "
                "and its base model with --model"
            )
        raise ModelError(f"--model {label}: not a model folder (no config.json)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"--model {label}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"--model {label}: config.json is not a JSON object")
    return config


def _quantization_kind(config: dict[str, Any], label: str) -> str | None:
    """None for a plain checkpoint, "bnb4bit" for a bitsandbytes 4-bit one; else a ModelError."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    from loraq.quant.bnb_format import is_bnb_4bit_config

    if is_bnb_4bit_config(config):
        return "bnb4bit"
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else "?"
    if method == "bitsandbytes" and qc.get("load_in_8bit"):
        raise ModelError(f"--model {label}: 8-bit bitsandbytes checkpoints are not supported; use the original model")
    raise ModelError(
        f"--model {label}: quantization method {method or '?'!r} is not supported "
        "(loraq reads plain checkpoints and bitsandbytes 4-bit ones)"
    )
