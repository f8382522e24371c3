"""``loraq eval`` on preference pairs: how often the model prefers the chosen answer.

For every pair of the file (rendered and cut as training does,
:mod:`loraq.data.preference`), the summed log-probabilities of the chosen and
the rejected answer: ``preference_accuracy`` is the share of pairs whose
chosen answer is the likelier (the same number as a run's
``final_preference_accuracy``). With a LoRA adapter on the model, the same
pairs are scored with the adapter switched off as well, which gives DPO's
implicit rewards against that base: ``reward_accuracy`` (share of pairs with
``(pc - rc) > (pr - rr)``) and ``reward_margin`` (mean of ``beta`` times
that difference).
"""
from __future__ import annotations

from typing import Any

import torch

from loraq.training.logps import SequenceLogps
from loraq.training.reference import score_pairs


def evaluate_pairs(model, tokenizer, path: str, *, fmt: str = "auto", seq_len: int = 2048, batch_size: int = 8,
                   beta: float = 0.1) -> dict[str, Any]:
    """The report above, as a dict (``loss``/``perplexity`` are None: pairs have no language-model loss)."""
    from loraq.config import TrainConfig
    from loraq.data.preference import build_preference_data
    from loraq.lora.model import disable_adapters, lora_layers

    cfg = TrainConfig(data=str(path), format=fmt, seq_len=seq_len, batch_size=batch_size, eval_samples=0)
    data = build_preference_data(cfg, tokenizer)
    module = SequenceLogps(model).eval()
    device = next(model.parameters()).device
    indices = range(len(data.train))
    policy = torch.empty(len(data.train), 2)
    score_pairs(module, data.train, indices, batch_size, data.pad_id, device, policy)
    report = {"data": str(path), "format": "preference", "examples": len(data.train), "pairs": len(data.train),
              "tokens": data.stats.train.tokens, "loss": None, "perplexity": None, "exact_match": None,
              "exact_match_examples": 0,
              "preference_accuracy": float((policy[:, 0] > policy[:, 1]).float().mean()),
              "chosen_logp_mean": float(policy[:, 0].mean()), "rejected_logp_mean": float(policy[:, 1].mean())}
    if lora_layers(model):
        base = torch.empty_like(policy)
        with disable_adapters(model):
            score_pairs(module, data.train, indices, batch_size, data.pad_id, device, base)
        margin = (policy[:, 0] - base[:, 0]) - (policy[:, 1] - base[:, 1])
        report.update(base_preference_accuracy=float((base[:, 0] > base[:, 1]).float().mean()),
                      reward_accuracy=float((margin > 0).float().mean()), reward_margin=float(beta * margin.mean()))
    return report
