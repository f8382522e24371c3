"""loraq: LoRA and QLoRA fine-tuning with a pure-PyTorch NF4/FP4 engine.

The Python API mirrors the CLI: ``loraq train`` is :func:`loraq.train`,
``loraq quantize`` is :func:`loraq.quantize`, and so on. Heavy modules are
imported lazily so ``import loraq`` stays cheap.
"""
from __future__ import annotations

import importlib

from loraq.errors import AdapterError, ConfigError, DataError, LoraqError, ModelError

__version__ = "0.1.0"

# public name -> "module:attribute"; resolved on first use
_LAZY = {
    "TrainConfig": "loraq.config:TrainConfig",
    "train": "loraq.train.api:train",
    "quantize": "loraq.quant.api:quantize",
    "merge": "loraq.lora.api:merge",
    "load_model": "loraq.models.load:load_model",
    "LoraConfig": "loraq.lora.config:LoraConfig",
    "inject_lora": "loraq.lora.model:inject_lora",
    "save_adapter": "loraq.lora.files:save_adapter",
    "load_adapter": "loraq.lora.files:load_adapter",
}

__all__ = ["LoraqError", "DataError", "ModelError", "AdapterError", "ConfigError", *_LAZY]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'loraq' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
