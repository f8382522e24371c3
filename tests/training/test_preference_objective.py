"""The pieces of DPO / ORPO against plain float64 definitions, and short runs through ``loraq.train``.

(The whole first step against TRL: test_preference_trl.py.)
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from loraq.training.logps import FusedTokenLogps, token_logps_reference
from loraq.training.loss import LossBuffers
from loraq.training.preference import dpo_losses, log1mexp


def test_fused_token_logps_equal_float64_with_gradient():
    gen = torch.Generator().manual_seed(0)
    n, d, vocab = 300, 24, 517  # several chunks, a partial last one
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    logp = FusedTokenLogps.apply(hidden, weight, bias, targets, 128, True, LossBuffers(), None)
    (logp * upstream).sum().backward()

    h64 = hidden.detach().double().requires_grad_(True)
    expected = token_logps_reference(h64 @ weight.double().t() + bias.double(), targets)
    (expected * upstream.double()).sum().backward()
    assert torch.allclose(logp.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert float((hidden.grad.double() - h64.grad).norm() / h64.grad.norm()) < 1e-5


def test_sequence_logps_fused_equal_full_logits(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from loraq.lora.config import LoraConfig
    from loraq.lora.model import inject_lora
    from loraq.training.logps import SequenceLogps, sequence_logps_reference

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 300, (4, 20), generator=gen)
    labels = ids.clone()
    labels[:, :8] = -100
    labels[1, 15:] = -100
    positions = torch.arange(20).expand(4, 20)
    fused = SequenceLogps(model)(ids, labels, positions).answer
    fused.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    plain = sequence_logps_reference(model, ids, labels, positions)
    plain.sum().backward()
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert float((grads[name] - p.grad).norm() / p.grad.norm().clamp(min=1e-12)) < 1e-4, name


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_moves_the_optimum_to_logit_of_one_minus_eps(eps):
    """Conservative DPO: with a share eps of labels assumed flipped, the loss is least where
    sigmoid(beta * delta) = 1 - eps (float64 grid over delta); at eps = 0 it only decreases."""
    beta = 0.5
    delta = torch.linspace(-30, 30, 60001, dtype=torch.float64)
    zeros = torch.zeros_like(delta)
    losses, _, _ = dpo_losses(delta, zeros, zeros, zeros, beta, eps)
    if eps == 0:
        assert bool((losses[1:] <= losses[:-1]).all())
        assert abs(float(losses[30000]) - math.log(2)) < 1e-12
        return
    best = float(delta[losses.argmin()])
    assert abs(best - math.log((1 - eps) / eps) / beta) < 2e-3


def test_log1mexp_equals_float64():
    x = torch.tensor([-1e-6, -0.01, -0.5, -math.log(2), -0.7, -3.0, -30.0], dtype=torch.float32)
    expected = [math.log(-math.expm1(v)) for v in x.double().tolist()]
    assert torch.allclose(log1mexp(x).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def write_pairs(path, n=16):
    words = ["red", "blue", "green", "cat", "dog", "fox", "one", "two", "sun", "moon"]
    with open(path, "w") as fh:
        for i in range(n):
            a, b = words[i % 10], words[(3 * i + 1) % 10]
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Join {a} and {b}."}],
                                 "chosen": f"{a}-{b}", "rejected": f"{b} {a}"}) + "\n")
    return path


def test_sft_then_dpo_from_its_adapter_then_orpo_full(tiny_llama_dir, tmp_path):
    """--init-adapter: the SFT adapter is the reference (the first step's loss is ln 2) and keeps its shape;
    --method full (ORPO, DPO) needs no second copy of the model."""
    import loraq

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    common = dict(model=str(tiny_llama_dir), method="lora", dtype="fp32", threads=1, seq_len=64, batch_size=4,
                  eval_samples=0)
    sft = loraq.train(data=str(write_chat(tmp_path / "chat.jsonl")), max_steps=2, rank=4, lr=1e-2,
                      output_dir=str(tmp_path / "sft"), **common)
    dpo = loraq.train(data=str(pairs), objective="dpo", init_adapter=str(sft.run_dir), max_steps=3, lr=1e-2,
                      val_fraction=0.25, output_dir=str(tmp_path / "dpo"), **common)
    first = json.loads((dpo.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-4 and abs(first["reward_margin"]) < 1e-4
    assert json.loads((dpo.run_dir / "adapter_config.json").read_text())["r"] == 4
    assert dpo.summary["objective"] == "dpo" and 0 <= dpo.summary["base_preference_accuracy"] <= 1
    full = {**common, "method": "full"}
    orpo = loraq.train(data=str(pairs), objective="orpo", max_steps=2, lr=1e-4, val_fraction=0.25,
                       output_dir=str(tmp_path / "orpo"), **full)
    assert math.isfinite(orpo.summary["train_loss"]) and orpo.summary["final_preference_accuracy"] is not None
    assert (orpo.run_dir / "model.safetensors").is_file()
    # full fine-tuning: the reference is the model before its first step (scored then), no second copy
    dpo_full = loraq.train(data=str(pairs), objective="dpo", max_steps=2, lr=1e-4, output_dir=str(tmp_path / "full"),
                           **full)
    first = json.loads((dpo_full.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-4


def write_chat(path):
    with open(path, "w") as fh:
        for word in ["red", "blue", "green", "cat", "dog", "fox", "one", "two"]:
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Say {word}."},
                                              {"role": "assistant", "content": word}]}) + "\n")
    return path


def test_eval_reports_preference_accuracy_from_the_model(tiny_llama_dir, tmp_path):
    """loraq.evaluate on pairs: the share of pairs whose chosen answer the model finds likelier, recounted from
    the model's full logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loraq
    from loraq.config import TrainConfig
    from loraq.data.preference import build_preference_data, collate_pairs
    from loraq.training.logps import sequence_logps_reference

    path = write_pairs(tmp_path / "pairs.jsonl", n=10)
    result = loraq.evaluate(path, model=str(tiny_llama_dir), dtype="fp32")
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    data = build_preference_data(TrainConfig(data=str(path), seq_len=2048), tok)
    wins = 0
    with torch.no_grad():
        for pair in data.train:
            b = collate_pairs([pair], [0], tok.pad_token_id)
            sums = sequence_logps_reference(model, b.input_ids, b.labels, b.position_ids, b.attention_mask)
            wins += int(sums[0] > sums[1])
    assert result["format"] == "preference" and result["pairs"] == 10
    assert result["preference_accuracy"] == wins / 10
