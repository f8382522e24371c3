"""``--init-adapter RUN``: a preference run that continues an SFT run's adapter.

The adapter (PEFT files in ``RUN``) is loaded as the run's trainable adapter,
with its own rank, alpha and targets; the model it gives at the start (base +
SFT adapter) is the DPO reference (:mod:`loraq.training.reference`), and the
adapter the run writes is the whole tuned adapter, usable on the base alone.
The base must be the one the SFT run trained on: its ``training_base.json``
(when present) must name the same method and 4-bit settings as this run.
"""
from __future__ import annotations

from torch import nn

from loraq.config import TrainConfig
from loraq.errors import ConfigError
from loraq.lora.config import LoraConfig


def init_adapter_config(cfg: TrainConfig) -> LoraConfig:
    """The adapter's config, after checking that it was trained on a base like this run's."""
    from loraq.lora.files import read_adapter_config
    from loraq.lora.record import read_training_base

    config = read_adapter_config(cfg.init_adapter)
    record = read_training_base(cfg.init_adapter, warn=lambda message: None)
    if record is None:
        return config
    if record.replays_init:
        raise ConfigError(f"--init-adapter {cfg.init_adapter}: a {record.init} adapter changed its base when it "
                          "started, which a preference run cannot rebuild; continue a default-init adapter")
    if record.method != cfg.method:
        raise ConfigError(f"--init-adapter {cfg.init_adapter} was trained with --method {record.method}; pass "
                          f"--method {record.method} so that it continues on the base it learned")
    if record.quant is not None and (record.quant.quant_type, record.quant.double_quant, record.quant.blocksize) != (
            cfg.quant, cfg.double_quant, cfg.blocksize):
        raise ConfigError(f"--init-adapter {cfg.init_adapter} was trained on a 4-bit base with "
                          f"{record.quant.describe()}; pass the same --quant, --double-quant and --blocksize")
    return config


def load_init_adapter(model: nn.Module, cfg: TrainConfig) -> None:
    """The adapter's weights into the model as its trainable adapter ``default`` (strict: every key checked)."""
    from loraq.lora.files import load_adapter

    load_adapter(model, cfg.init_adapter, allow_pickle=cfg.allow_pickle)
