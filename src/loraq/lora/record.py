"""What an adapter was trained against: ``training_base.json``, beside ``adapter_config.json``.

A QLoRA adapter learns a correction for the 4-bit weights it was trained on;
applied to the full-precision weights, part of that correction is wrong. So a
run writes, next to the PEFT files (PEFT ignores the extra file), everything
needed to rebuild the base it trained against::

    {"format": "loraq-training-base", "version": 1,
     "method": "qlora" | "lora",
     "compute_dtype": "bf16",
     "quant": {"quant_type": "nf4", "double_quant": true, "blocksize": 64} | null,
     "init": "default" | "gaussian" | "pissa" | "loftq" | ...,
     "loftq_iters": 5 | null,
     "initial_factors_appended": false,
     "base_correction": false,
     "base_model": {"name_or_path": "...", "kind": "default|dir|hub|gguf|bnb4bit", "fingerprint": "sampled-sha256:..."}}

``initial_factors_appended``: the init changed the model's function at the
start (PiSSA, LoftQ: see :mod:`loraq.lora.files`), so the file holds the
update relative to the untouched base, ``[B, -B0] [A; A0]`` at rank 2r; the
trained factors are the first r of each. PiSSA and LoftQ also changed the
frozen base itself, which :mod:`loraq.lora.adapted` rebuilds by replaying the
initialisation. ``base_correction`` (the calibrated init): the 4-bit base
``q(W)`` trained with a frozen correction ``s B0 A0`` beside the adapter, so
the trained base is ``q(W) + s B0 A0 ~ W``; the file is an ordinary adapter of
the full-precision weights, and ``B0, A0`` are in ``base_correction.safetensors``
beside it (nothing to replay, no calibration data needed). An adapter made
elsewhere has no record; a record that cannot
be read is reported and ignored (the adapter is then treated as one from
elsewhere), never a crash.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraq.paths import atomic_write_text

RECORD_NAME = "training_base.json"
FORMAT = "loraq-training-base"
VERSION = 1
BASE_CHANGING_INITS = ("pissa", "loftq")  # the frozen base is not the plain (quantized) model's
FUNCTION_CHANGING_INITS = BASE_CHANGING_INITS  # s B0 A0 != 0 and trained: the file appends the initial factors
CORRECTING_INITS = ("calibrated",)  # a frozen correction of the 4-bit base beside the adapter


@dataclass(frozen=True)
class QuantSettings:
    """How a 4-bit base is quantized (the keyword arguments of ``Linear4bit.from_linear`` but the dtype)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64

    def describe(self) -> str:
        return f"{self.quant_type}{'+DQ' if self.double_quant else ''}, blocksize {self.blocksize}"


@dataclass(frozen=True)
class BaseModelId:
    name_or_path: str | None
    kind: str
    fingerprint: str | None


@dataclass(frozen=True)
class TrainingBase:
    """The record (see the module docstring)."""

    method: str
    compute_dtype: str
    quant: QuantSettings | None
    init: str
    base_model: BaseModelId
    loftq_iters: int | None = None
    initial_factors_appended: bool = False
    base_correction: bool = False

    @property
    def replays_init(self) -> bool:
        """The frozen base was changed by the initialisation: rebuilding it means running that again."""
        return self.init in BASE_CHANGING_INITS

    def describe(self) -> str:
        """``4-bit base (nf4+DQ, blocksize 64)`` or ``full-precision base (bf16)``."""
        if self.quant is not None:
            return f"4-bit base it was trained on ({self.quant.describe()})"
        return f"full-precision base it was trained on ({self.compute_dtype})"

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingBase:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r} is not "
                             f"{FORMAT!r} version {VERSION}")
        quant = data["quant"]
        return cls(method=str(data["method"]), compute_dtype=str(data["compute_dtype"]),
                   quant=None if quant is None else QuantSettings(str(quant["quant_type"]), bool(quant["double_quant"]),
                                                                  int(quant["blocksize"])),
                   init=str(data["init"]), base_model=BaseModelId(**data["base_model"]),
                   loftq_iters=data.get("loftq_iters"),
                   initial_factors_appended=bool(data.get("initial_factors_appended", False)),
                   base_correction=bool(data.get("base_correction", False)))


def write_training_base(folder: str | Path, record: TrainingBase) -> Path:
    path = Path(folder) / RECORD_NAME
    atomic_write_text(path, json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_training_base(folder: str | Path, warn: Callable[[str], None]) -> TrainingBase | None:
    """The folder's record; None when there is none, or (after a warning) when it cannot be read."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return TrainingBase.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        warn(f"{path} is unreadable ({exc}); ignoring it and assuming a full-precision base")
        return None
