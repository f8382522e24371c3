"""DPO and ORPO: the losses on per-sequence log-probabilities, and a step's and an evaluation's metrics.

Per pair ``i``: ``pc, pr`` are the summed log-probabilities of the chosen and
the rejected answer under the policy (:class:`loraq.training.logps.SequenceLogps`),
``rc, rr`` the same under the reference (the model as the run starts,
computed once per pair: :mod:`loraq.training.reference`), ``nc, nr`` the
answers' token counts.

DPO, sigmoid loss (Rafailov et al. 2023), ``beta`` = ``--beta``, label
smoothing ``eps`` (the share of labels assumed flipped: conservative DPO)::

    delta  = (pc - rc) - (pr - rr)
    loss_i = -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)
    rewards: chosen beta (pc - rc), rejected beta (pr - rr)

ORPO (Hong et al. 2024), ``lam`` = ``--orpo-lambda``, on the mean
log-probabilities ``ac = pc / nc``, ``ar = pr / nr``::

    log_odds = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar)))
    loss     = NLL of the chosen tokens / their count - lam mean_i log sigmoid(log_odds_i)
    rewards: chosen lam ac, rejected lam ar                     (TRL's convention)

The NLL covers the chosen answer's tokens (with ``--train-on-inputs`` the
prompt's too, as TRL's ORPOTrainer does). A step's loss is a mean over its
global batch: each micro-batch's sum over its pairs (and, for the NLL, its
tokens) is divided by the global batch's count, so accumulation gives the
same update as one big batch.

Metrics (per logged step and per evaluation): ``rewards_chosen``,
``rewards_rejected``, ``reward_margin`` (means over pairs),
``reward_accuracy`` (share of pairs whose chosen reward is the higher) and
``preference_accuracy`` (share whose chosen answer has the higher summed
log-probability: the model's own preference, with no reference; the number
``base_preference_accuracy`` / ``final_preference_accuracy`` report).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loraq.data.preference import PairBatch
from loraq.data.tokenize import IGNORE_INDEX
from loraq.training.evaluate import EvalLoss
from loraq.training.logps import RowLogps


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (two branches split at ``-log 2``)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_losses(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """(per-pair loss, chosen rewards, rejected rewards): the module docstring's DPO formulas."""
    delta = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def orpo_odds(pc, pr, nc, nr, lam: float):
    """(per-pair log sigmoid(log_odds), log_odds, chosen rewards, rejected rewards) from summed log-probabilities."""
    ac, ar = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    return F.logsigmoid(log_odds), log_odds, lam * ac.detach(), lam * ar.detach()


@dataclass
class PairCounts:
    """The global batch's counts each micro-batch's sums are divided by."""

    pairs: int
    nll_tokens: int


@dataclass
class PairStats:
    """Sums over pairs (and NLL tokens), turned into means by :meth:`means`."""

    pairs: int = 0
    loss: float = 0.0
    rewards_chosen: float = 0.0
    rewards_rejected: float = 0.0
    reward_wins: int = 0
    preference_wins: int = 0
    nll: float = 0.0
    nll_tokens: int = 0
    log_odds: float = 0.0

    def add(self, pair_losses, chosen_r, rejected_r, rows: RowLogps, log_odds=None) -> None:
        b = chosen_r.shape[0]
        self.pairs += b
        self.loss += float(pair_losses.detach().sum())
        self.rewards_chosen += float(chosen_r.sum())
        self.rewards_rejected += float(rejected_r.sum())
        self.reward_wins += int((chosen_r > rejected_r).sum())
        self.preference_wins += int((rows.answer[:b] > rows.answer[b:]).sum())
        if rows.nll is not None:
            self.nll += float(rows.nll[:b].detach().sum())
            self.nll_tokens += int(rows.nll_tokens[:b].sum())
        if log_odds is not None:
            self.log_odds += float(log_odds.detach().sum())

    def means(self, objective: str) -> dict[str, float]:
        n = max(self.pairs, 1)
        out = {"rewards_chosen": self.rewards_chosen / n, "rewards_rejected": self.rewards_rejected / n,
               "reward_margin": (self.rewards_chosen - self.rewards_rejected) / n,
               "reward_accuracy": self.reward_wins / n, "preference_accuracy": self.preference_wins / n}
        if objective == "orpo":
            out["nll"] = self.nll / max(self.nll_tokens, 1)
            out["log_odds_ratio"] = self.log_odds / n
        return out


@dataclass
class PreferenceEval(EvalLoss):
    """An evaluation over the validation pairs: ``loss`` the objective's mean, ``metrics`` the means above."""

    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:  # not a language-model loss: no perplexity
        return float("nan")


class PreferenceObjective:
    """DPO or ORPO for the loop: ``counts(micro)``, ``loss(module, batch, counts)``, ``step_metrics()``, ``validate``.

    ``reference``: the cached reference log-probabilities (``.train`` / ``.val``, [pairs, 2]); None for ORPO.
    """

    def __init__(self, name: str, *, beta: float = 0.1, label_smoothing: float = 0.0, orpo_lambda: float = 0.1,
                 train_on_inputs: bool = False, reference=None):
        self.name, self.beta, self.label_smoothing = name, beta, label_smoothing
        self.orpo_lambda, self.train_on_inputs, self.reference = orpo_lambda, train_on_inputs, reference
        self._step = PairStats()

    def counts(self, micro: list[PairBatch]) -> PairCounts:
        return PairCounts(pairs=max(1, sum(b.global_pairs for b in micro)),
                          nll_tokens=max(1, sum(int(self.nll_labels(b)[1]) for b in micro)))

    def nll_labels(self, batch: PairBatch) -> tuple[torch.Tensor | None, int]:
        """ORPO's SFT targets (chosen rows: the answer, or every token with --train-on-inputs) and their count."""
        if self.name != "orpo":
            return None, 0
        b = batch.pairs
        labels = torch.full_like(batch.labels, IGNORE_INDEX)
        if self.train_on_inputs:
            chosen = batch.input_ids[:b].masked_fill(batch.attention_mask[:b] == 0, IGNORE_INDEX)
            chosen[:, 0] = IGNORE_INDEX  # the first token is never predicted
            labels[:b] = chosen
        else:
            labels[:b] = batch.labels[:b]
        return labels, int((labels[:, 1:] != IGNORE_INDEX).sum())

    def loss(self, loss_module: nn.Module, batch: PairBatch, counts: PairCounts, split: str = "train",
             stats: PairStats | None = None) -> torch.Tensor:
        """This micro-batch's share of the step's loss (its sums over the global counts); metrics into ``stats``."""
        nll_labels, _ = self.nll_labels(batch)
        rows: RowLogps = loss_module(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask,
                                     nll_labels=nll_labels)
        b = batch.pairs
        pc, pr = rows.answer[:b], rows.answer[b:]
        stats = self._step if stats is None else stats
        if self.name == "dpo":
            ref = self.reference.for_split(split)[batch.pair_index].to(pc.device)
            losses, chosen_r, rejected_r = dpo_losses(pc, pr, ref[:, 0], ref[:, 1], self.beta, self.label_smoothing)
            stats.add(losses, chosen_r, rejected_r, rows)
            return losses.sum() / counts.pairs
        log_sig, log_odds, chosen_r, rejected_r = orpo_odds(pc, pr, rows.answer_tokens[:b], rows.answer_tokens[b:],
                                                            self.orpo_lambda)
        losses = -self.orpo_lambda * log_sig
        stats.add(losses, chosen_r, rejected_r, rows, log_odds)
        return rows.nll[:b].sum() / counts.nll_tokens + losses.sum() / counts.pairs

    def step_metrics(self) -> dict[str, float]:
        """The means over the step's pairs (then reset for the next step)."""
        stats, self._step = self._step, PairStats()
        return stats.means(self.name)

    def validate(self, loss_module: nn.Module, batches, device: torch.device, runtime=None) -> PreferenceEval | None:
        """The objective and its metrics over every validation pair, without touching the run's random stream."""
        stats, was, rng = PairStats(), loss_module.training, torch.get_rng_state()
        loss_module.eval()
        try:
            with torch.no_grad():
                for batch in batches():
                    batch = batch.to(device)
                    self.loss(loss_module, batch, PairCounts(1, 1), split="val", stats=stats)
        finally:
            torch.set_rng_state(rng)
            loss_module.train(was)
        if not stats.pairs:
            return None
        metrics = stats.means(self.name)
        loss = stats.loss / stats.pairs + (metrics["nll"] if self.name == "orpo" else 0.0)
        return PreferenceEval(loss=loss, tokens=stats.pairs, metrics=metrics)
