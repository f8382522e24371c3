"""Helpers for the LoRA tests: tiny models, PEFT references, random adapters."""
from __future__ import annotations

import torch

VOCAB = 300


def tiny_model(seed: int = 0, tie: bool = True, hidden: int = 64, layers: int = 2):
    """A random 2-layer Llama (fp32, eval mode); the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def token_ids(seed: int = 1, batch: int = 2, length: int = 12, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randomize_lora(model, seed: int = 0, std: float = 0.05) -> None:
    """Random A and B in every LoRA layer (ours or PEFT's): B starts at zero, which would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_model(base, adapter_name: str = "default", **lora_kwargs):
    """PEFT's LoRA on ``base`` (the independent reference), task CAUSAL_LM."""
    import peft

    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    return peft.get_peft_model(base, cfg, adapter_name=adapter_name)


def peft_lora_layers(pm) -> dict[str, object]:
    """PEFT's LoRA layers by module name (as in the base model)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def copy_ours_to_peft(ours, pm, adapter_name: str = "default") -> None:
    """Give PEFT's layers the A/B of ours (by module name); fails if the layer sets differ."""
    from loraq.lora.model import lora_layers

    theirs = {n: m for n, m in peft_lora_layers(pm).items() if adapter_name in m.lora_A}
    mine = {n: layer for n, layer in lora_layers(ours) if adapter_name in layer.lora_A}
    assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
    with torch.no_grad():
        for n, layer in mine.items():
            theirs[n].lora_A[adapter_name].weight.copy_(layer.lora_A[adapter_name].weight)
            theirs[n].lora_B[adapter_name].weight.copy_(layer.lora_B[adapter_name].weight)


def assert_one_line(text: str, *needles: str) -> None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
