"""Adapter folders for tests/serving (a module of its own: ``conftest`` is a name every test folder has)."""
from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]


def save_random_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, targets=TARGETS, **config) -> Path:
    """A LoRA adapter of the model in ``base_dir`` with random (non-zero) factors, saved as a PEFT folder."""
    from transformers import AutoModelForCausalLM

    from loraq.lora.config import LoraConfig
    from loraq.lora.files import save_adapter
    from loraq.lora.model import inject_lora

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    inject_lora(model, LoraConfig(r=r, alpha=2.0 * r, target_modules=list(targets), **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return save_adapter(model, out)
