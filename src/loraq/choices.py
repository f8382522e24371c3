"""Every list of choices a flag, a recipe key or an API keyword takes, in one place.

Commands build their ``choices=`` from these; the API functions and
``TrainConfig.validate`` check against them; the 4-bit engine keys its code
tables by :data:`QUANT_TYPES`.
"""
from __future__ import annotations

import torch

METHODS = ("qlora", "lora", "full")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 where the hardware computes it natively
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # what files are written in
INITS = ("default", "gaussian", "pissa", "loftq", "calibrated")
SCHEDULES = ("cosine", "linear", "constant")
DATA_FORMATS = ("chat", "sharegpt", "alpaca", "completion", "text", "preference")
FORMATS = ("auto", *DATA_FORMATS)
NONFINITE = ("stop", "skip")
OBJECTIVES = ("sft", "dpo", "orpo", "grpo")  # sft: next-token loss; dpo/orpo: preference pairs; grpo: rewards
PREFERENCE_OBJECTIVES = ("dpo", "orpo")
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")  # GRPO's token-loss reductions (TRL's loss_type)
SCALE_REWARDS = ("group", "batch", "none")  # GRPO's advantage scaling
IMPORTANCE_LEVELS = ("token", "sequence")  # GRPO's importance weights
INFERENCE_QUANT = ("auto", "none", *QUANT_TYPES)  # the base generate/chat/eval load: auto = as trained
MERGE_INTO = ("auto", "dequantized", "original", "requantized")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # --report-to: experiment trackers (optional extras)

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # loraq export --quant
EXPORT_FORMATS = ("gguf", "gguf-lora")  # loraq export --format: the whole model, or the adapter alone
