"""GRPO's objective (loraq.training.grpo) against TRL 1.16's GRPOTrainer on the same model and inputs: the loss
value and its gradients for every loss type, token and sequence importance weights, on- and off-policy, with
and without the KL term; the group advantages against a float64 formula."""
from __future__ import annotations

import math

import pytest
import torch

from loraq.errors import ConfigError
from loraq.training.grpo import GrpoSettings, group_advantages, policy_loss

G, PROMPT, COMPLETION = 4, 5, 7


def trl_trainer(tiny_llama_dir, tmp_path, settings: GrpoSettings, temperature: float = 1.0):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=G, num_generations=G,
                      max_completion_length=settings.max_completion_length, beta=settings.beta,
                      epsilon=settings.epsilon, epsilon_high=settings.epsilon_high, loss_type=settings.loss_type,
                      scale_rewards=settings.scale_rewards,
                      importance_sampling_level=settings.importance_sampling_level,
                      use_bias_correction_kl=settings.use_bias_correction_kl, report_to=[], use_cpu=True,
                      temperature=temperature,
                      bf16=False, logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * G),
                          processing_class=AutoTokenizer.from_pretrained(str(tiny_llama_dir)))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()  # TRL logs under "train" (the tiny Llama has no dropout)
    return trainer


def inputs(seed: int, off_policy: bool, beta: float, vocab: int = 300) -> dict:
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(G, COMPLETION, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    out = {"prompt_ids": torch.randint(3, vocab, (G, PROMPT), generator=g),
           "prompt_mask": torch.ones(G, PROMPT, dtype=torch.long),
           "completion_ids": torch.randint(3, vocab, (G, COMPLETION), generator=g),
           "completion_mask": completion_mask, "advantages": torch.randn(G, generator=g),
           "num_items_in_batch": completion_mask.sum()}
    if off_policy:  # the sampling policy's log-probabilities, a little off this one's: clipping happens
        out["old_per_token_logps"] = -3 + 1.0 * torch.randn(G, COMPLETION, generator=g)
    if beta:
        out["ref_per_token_logps"] = -3 + 0.5 * torch.randn(G, COMPLETION, generator=g)
    return out


def our_logps(model, batch: dict) -> torch.Tensor:
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, PROMPT - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None])[..., 0]


CASES = [GrpoSettings(loss_type=t) for t in ("dapo", "grpo", "bnpo", "dr_grpo")] + [
    GrpoSettings(loss_type="grpo", importance_sampling_level="sequence"),
    GrpoSettings(loss_type="dapo", beta=0.04, epsilon=0.1, epsilon_high=0.28),
    GrpoSettings(loss_type="grpo", beta=0.1), GrpoSettings(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False)]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s.loss_type}-{s.importance_sampling_level}-b{s.beta}")
@pytest.mark.parametrize("off_policy", [False, True])
def test_loss_and_gradients_equal_trl(tiny_llama_dir, tmp_path, settings, off_policy):
    trainer = trl_trainer(tiny_llama_dir, tmp_path, settings)
    model = trainer.model
    batch = inputs(7, off_policy, settings.beta)
    theirs = trainer._compute_loss(model, dict(batch))
    their_grads = torch.autograd.grad(theirs, list(model.parameters()))
    ours, metrics = policy_loss(our_logps(model, batch), batch["advantages"], batch["completion_mask"], settings,
                                old_logps=batch.get("old_per_token_logps"), ref_logps=batch.get("ref_per_token_logps"),
                                num_items=float(batch["num_items_in_batch"]))
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5, abs=1e-6)
    for mine, reference in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
        if key in metrics:
            assert metrics[key] == pytest.approx(logged[key], abs=1e-6), key
    if off_policy:
        assert metrics["clip_ratio/region_mean"] > 0  # the clipping is exercised


def test_group_advantages_equal_the_float64_formula_with_unscored_completions():
    rewards = torch.tensor([[1.0, 0.5], [0.0, float("nan")], [1.0, 1.0], [float("nan"), float("nan")],
                            [0.2, 0.0], [0.2, 0.0], [0.2, 0.0], [0.2, 0.0]])
    weights = torch.tensor([1.0, 2.0])
    for scale in ("group", "batch", "none"):
        got, total, zero = group_advantages(rewards, weights, 4, scale)
        r = [1 + 2 * 0.5, 0.0, 1 + 2, None, 0.2, 0.2, 0.2, 0.2]
        want = []
        everyone = [v for v in r if v is not None]
        for start in (0, 4):
            group = [v for v in r[start:start + 4] if v is not None]
            mean = sum(group) / len(group)
            pool = group if scale == "group" else everyone
            m = sum(pool) / len(pool)
            std = math.sqrt(sum((v - m) ** 2 for v in pool) / (len(pool) - 1))
            for v in r[start:start + 4]:
                a = 0.0 if v is None else (v - mean) / ((std + 1e-4) if scale != "none" else 1.0)
                want.append(a)
        assert got.double().tolist() == pytest.approx(want, abs=1e-5), scale
        assert zero.tolist()[4:] == [scale != "batch"] * 4


def test_settings_refuse_what_trl_refuses():
    with pytest.raises(ConfigError, match="--loss-type"):
        GrpoSettings(loss_type="ppo")
    with pytest.raises(ConfigError, match="sequence"):
        GrpoSettings(loss_type="dapo", importance_sampling_level="sequence")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "full-logits"])
def test_per_token_logps_equal_trl_at_a_temperature(tiny_llama_dir, tmp_path, fused):
    """TokenLogps (the policy's per-token log-probabilities and entropies, fused head or full logits) equals TRL's
    ``_get_per_token_logps_and_entropies`` on completions of different lengths, at temperature 0.7."""
    from loraq.training.logps import TokenLogps

    trainer = trl_trainer(tiny_llama_dir, tmp_path, GrpoSettings(), temperature=0.7)
    model = trainer.model
    batch = inputs(3, False, 0.0)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    theirs, their_entropy = trainer._get_per_token_logps_and_entropies(model, ids, mask, COMPLETION,
                                                                        compute_entropy=True)[:2]
    model.lm_head.weight.requires_grad_(not fused)  # the fused head scores a frozen head only
    module = TokenLogps(model)
    assert module._fused == fused or not fused
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :PROMPT] = -100
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    ours, entropy = (t[:, PROMPT:] for t in module(ids, labels, positions, mask, temperature=0.7, entropy=True))
    scored = batch["completion_mask"].bool()
    assert torch.allclose(ours[scored], theirs[scored].float(), atol=1e-5, rtol=0)
    assert (ours[~scored] == 0).all()
    assert torch.allclose(entropy[scored], their_entropy[scored].float(), atol=1e-5, rtol=0)
    assert entropy[scored].min() > 0.1  # a tiny random model is far from certain: the comparison is not 0 == 0
    assert torch.equal(module(ids, labels, positions, mask, temperature=0.7)[:, PROMPT:], ours)
