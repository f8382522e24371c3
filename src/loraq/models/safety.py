"""Safe loading: which weight files of a folder may be read, and whether its code may run.

* Weights come from ``*.safetensors`` (plain tensors, nothing executes). A
  folder with only pickle files (``*.bin``, ``*.pt``, ``*.pth``: unpickling
  can run arbitrary code) is refused unless ``allow_pickle``.
* A config whose architecture needs the folder's own Python code (``auto_map``
  with a ``model_type`` transformers does not know) is refused unless
  ``trust_remote_code``. With a known ``model_type`` the built-in class is used
  and the folder's code is ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraq.errors import ModelError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


@dataclass(frozen=True)
class WeightFiles:
    """The weight files to read: ``format`` is "safetensors" or "pickle"."""

    format: str
    files: tuple[Path, ...]


def weight_files(folder: Path, allow_pickle: bool = False, label: str | None = None) -> WeightFiles:
    """The folder's weight files, safetensors preferred; a ModelError when none may be read."""
    folder = Path(folder)
    label = label or str(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return WeightFiles("safetensors", _indexed_shards(index, label))
    safe = sorted(p for p in folder.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if safe:
        return WeightFiles("safetensors", tuple(safe))
    pickles = sorted(p for p in folder.iterdir()
                     if p.suffix in PICKLE_SUFFIXES and p.name not in _NOT_WEIGHTS and p.is_file())
    if pickles and not allow_pickle:
        raise ModelError(
            f"--model {label}: only pickle weights ({pickles[0].name}), which can run code when loaded; "
            "pass --allow-pickle if you trust this folder, or convert it to safetensors"
        )
    if pickles:
        return WeightFiles("pickle", tuple(pickles))
    raise ModelError(f"--model {label}: no weight files (expected *.safetensors next to config.json)")


def _indexed_shards(index: Path, label: str) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"--model {label}: {index.name} is not a valid index ({exc})") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise ModelError(f"--model {label}: shard {missing[0]} listed in {index.name} is missing "
                         f"({len(missing)} of {len(names)} missing); the download is incomplete")
    return tuple(index.parent / n for n in names)


def check_remote_code(config: dict[str, Any], trust_remote_code: bool, label: str) -> None:
    """Refuse a model that needs its own code unless trusted; refuse an unknown architecture."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    known = model_type in CONFIG_MAPPING
    if config.get("auto_map") and not known and not trust_remote_code:
        raise ModelError(
            f"--model {label}: this model needs its own Python code (auto_map in config.json); "
            "pass --trust-remote-code only if you trust its source"
        )
    if not known and not config.get("auto_map"):
        import transformers

        what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
        raise ModelError(f"--model {label}: {what} is not supported by transformers {transformers.__version__}; "
                         "upgrade transformers or use another model")
