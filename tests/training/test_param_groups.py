"""LoRA+ (``--loraplus-lr-ratio``) and ``--embedding-lr``: which parameter learns at which rate.

References: PEFT's ``create_loraplus_optimizer`` (the rate of every adapter parameter), and Adam's first
step, whose size is the learning rate itself (``m / sqrt(v) = g / |g|``), read from the files a run wrote.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import loraq
from loraq.lora.config import LoraConfig
from loraq.lora.model import inject_lora
from loraq.training.param_groups import param_groups, parameter_rates


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_rates_are_peft_s_loraplus_rates(dora):
    import peft
    from peft.optimizers import create_loraplus_optimizer

    theirs = peft.get_peft_model(_tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          use_dora=dora, task_type="CAUSAL_LM"))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    peft_names = {name.removeprefix("base_model.model.").removesuffix(".weight"): peft_rate[id(p)]
                  for name, p in theirs.named_parameters() if p.requires_grad}

    ours = _tiny()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["all-linear"], use_dora=dora))
    rates = parameter_rates(ours, 1e-3, 16)
    our_names = {name.removesuffix(".weight"): rates[id(p)] for name, p in ours.named_parameters() if p.requires_grad}
    assert our_names == peft_names
    assert sorted({r for r in our_names.values()}) == [1e-3, 1.6e-2]


def test_groups_split_rates_and_weight_decay_and_full_training_gives_embeddings_their_rate():
    ours = _tiny()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["norm"], use_dora=True))
    groups = param_groups(ours, 1e-3, 0.1, loraplus_lr_ratio=4, embedding_lr=5e-5)
    described = sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in groups)
    # A (2 layers); B (2 layers); the magnitudes (2, no decay); the saved final norm's weight (no decay)
    assert described == sorted([(1e-3, 0.1, 2), (4e-3, 0.1, 2), (4e-3, 0.0, 2), (5e-5, 0.0, 1)])
    full = _tiny()
    rates = parameter_rates(full, 1e-3, embedding_lr=5e-5)
    embeddings = {id(full.get_input_embeddings().weight), id(full.get_output_embeddings().weight)}
    assert {rates[i] for i in embeddings} == {5e-5}
    assert {r for i, r in rates.items() if i not in embeddings} == {1e-3}


def _chat(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Join {a} and {b}."},
                          {"role": "assistant", "content": f"{a}-{b}"}]}
            for a, b in [("red", "sun"), ("blue", "cat"), ("green", "dog"), ("one", "two")]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_one_step_moves_b_by_its_loraplus_rate_and_saved_modules_by_the_embedding_rate(tiny_llama_dir, tmp_path):
    """Adam's first step changes each parameter by its rate times ``g / (|g| + eps)``: B starts at zero, so its
    largest entry after one step is B's rate; A gets no gradient while B is zero; the embeddings, trained in
    full, move by at most their own rate."""
    from safetensors import safe_open

    lr, ratio, embedding_lr = 1e-3, 16.0, 3e-4
    run = loraq.train(model=str(tiny_llama_dir), data=str(_chat(tmp_path)), method="lora", max_steps=1,
                      batch_size=4, seq_len=48, dtype="fp32", output_dir=str(tmp_path / "run"), eval_samples=0,
                      lr=lr, warmup=0, schedule="constant", loraplus_lr_ratio=ratio, embedding_lr=embedding_lr,
                      modules_to_save=["embed_tokens"], threads=1).run_dir
    tensors = load_file(str(run / "adapter_model.safetensors"))
    b = torch.cat([t.flatten() for k, t in tensors.items() if k.endswith("lora_B.weight")])
    assert float(b.abs().max()) == pytest.approx(lr * ratio, rel=1e-3)
    with safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as f:
        before = f.get_tensor("model.embed_tokens.weight")
    after = next(t for k, t in tensors.items() if k.endswith("embed_tokens.weight"))
    assert float((after - before).abs().max()) == pytest.approx(embedding_lr, rel=1e-3)
