"""What the memory formulas need of a run besides the model and the data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    """What the formulas need of a run besides the model and the data (resolved from TrainConfig)."""

    method: str
    batch_size: int
    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32
    device: str  # "cpu" or "cuda"
    grad_checkpointing: bool
    double_quant: bool
    blocksize: int
    eval_every: int
    lora: Any = None  # the LoraConfig the run adapts with (None: --method full)
    quant_type: str = "nf4"
