"""The planner's probe on every family: what a real training forward keeps, for models it has never seen.

Each of the fifteen tiny families (``family_configs.py``) is built with three
decoder blocks, loaded and prepared as training does, and run on real tensors
under ``saved_tensors_hooks`` (each storage once, the weights left out): the
reference. The probe builds the same class with two blocks on storage-less
tensors, at 16-48 tokens, and scales; it must name the same bytes exactly,
for LoRA on a padded batch, through loraq's matmul attention (four causal
blocks at 200 tokens) or whatever attention the family keeps (softcapping,
dropout, GPT-2's Conv1D layers). 4-bit layers, full fine-tuning and
checkpointing: ``test_activations.py``.
"""
from __future__ import annotations

import pytest
import torch
from autograd_saved import kept_storages

from family_configs import FAMILIES, save_family
from loraq.config import TrainConfig
from loraq.lora.config import LoraConfig
from loraq.planning.probe import ActivationProbe, ProbeRun


def backbone_saved_bytes(folder, method: str, batch: int, length: int, pad: int) -> int:
    from loraq.kernels import apply_fast_paths
    from loraq.lora.model import inject_lora
    from loraq.models.load import load_model

    model = load_model(str(folder), method=method, dtype="bf16").model
    apply_fast_paths(model)
    inject_lora(model, LoraConfig.from_train_config(TrainConfig(method=method)))
    model.train()
    ids = torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - pad:] = 0
    backbone = getattr(model, model.base_model_prefix)
    with kept_storages(model) as kept:
        backbone(input_ids=ids, position_ids=torch.arange(length).expand(batch, length),
                 attention_mask=mask if pad else None, use_cache=False)
    return sum(kept.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_probe_names_the_bytes_a_real_forward_keeps(family, tiny_tokenizer, tmp_path):
    folder = save_family(family, tiny_tokenizer, tmp_path / family, size={"layers": 3})
    batch, length, pad = 3, 200, 7
    run = ProbeRun("lora", torch.bfloat16, "cpu", False, LoraConfig.from_train_config(TrainConfig(method="lora")),
                   ("nf4", True, 64))
    predicted = ActivationProbe(folder).saved(run, batch, length, masked=True).total(batch, length)
    assert predicted == backbone_saved_bytes(folder, "lora", batch, length, pad)
