"""GRPO's objective (issue 31): group-relative advantages and the clipped policy loss, beside DPO's
(:mod:`loraq.training.preference`). The math is TRL 1.16's ``GRPOTrainer`` (its names and defaults); a test
holds :func:`policy_loss` to TRL's own ``_compute_loss`` on the same model and inputs.

**Advantages.** ``G`` completions per prompt, rewards ``r_{i,f}`` from reward function ``f`` (NaN: it could not
score), weights ``w_f``: ``r_i = sum_f w_f r_{i,f}`` (NaN only when every function gave NaN: *unscorable*);
``A_i = r_i - mean_group(r)``, divided by ``std + 1e-4`` where ``scale_rewards`` is ``group`` (the group's
sample std) or ``batch`` (the whole batch's), left as is for ``none``. Means and stds skip NaNs; an unscorable
completion gets ``A_i = 0``. ``std_zero`` marks completions whose group (or batch) std is 0: no signal.

**Loss.** Per completion token ``t`` of completion ``i`` (``mask``: 1 on completion tokens), with ``lp`` the
policy's log-probability, ``lp_old`` the sampling policy's (``lp.detach()`` on-policy, ``--num-iterations 1``)::

    w = exp(lp - lp_old)                     (token level; sequence level: exp of its masked mean per row)
    l_t = -min(w A_i, clip(w, 1 - eps_low, 1 + eps_high) A_i) + beta * kl_t
    kl_t = (exp(lp_ref - lp) - (lp_ref - lp) - 1) * w     (``* w``: use_bias_correction_kl, TRL's default: its
                                                          gradient is the unbiased reverse-KL one, even on-policy)

and the rows' ``l_t`` reduced by ``loss_type``: ``grpo`` the mean over rows of each row's token mean; ``bnpo``
the mean over all tokens; ``dr_grpo`` the sum over ``rows x max_completion_length``; ``dapo`` (TRL's default)
the sum over the tokens of the whole generation batch (``num_items``, this batch's own count when not given).
On-policy ``w = 1`` in value, so the loss's value is ``-mean(A)`` (about 0), while its gradient is
``-A_i d lp_t``: why a GRPO run's loss says little and its reward says what happens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraq.choices import IMPORTANCE_LEVELS, LOSS_TYPES, SCALE_REWARDS
from loraq.errors import ConfigError

STD_EPS = 1e-4


@dataclass(frozen=True)
class GrpoSettings:
    """TRL 1.16 GRPOConfig's names and defaults (``epsilon_high`` None: ``epsilon``)."""

    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    max_completion_length: int = 256
    use_bias_correction_kl: bool = True  # the KL term times the importance weight (DeepSeek-V3.2; TRL's default)

    def __post_init__(self) -> None:
        for flag, value, allowed in (("--loss-type", self.loss_type, LOSS_TYPES),
                                     ("--scale-rewards", self.scale_rewards, SCALE_REWARDS),
                                     ("--importance-sampling-level", self.importance_sampling_level,
                                      IMPORTANCE_LEVELS)):
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")
        if self.importance_sampling_level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo"):
            raise ConfigError(f"--importance-sampling-level sequence goes with --loss-type grpo (the {self.loss_type} "
                              "loss sums tokens, which a weight per sequence would count once per token)")
        if not self.epsilon >= 0 or (self.epsilon_high is not None and not self.epsilon_high >= 0):
            raise ConfigError("--epsilon and --epsilon-high must be >= 0")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_up(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The sample standard deviation (n - 1) skipping NaNs."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    squares = torch.nansum((x - mean) ** 2, dim=dim) if dim is not None else torch.nansum((x - mean) ** 2)
    return (squares / (count - 1)).sqrt()


def group_advantages(rewards: torch.Tensor, weights: torch.Tensor, generations: int,
                     scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(advantages [B], rewards [B], std_zero [B])`` of ``rewards [B, F]`` (NaN: not scored) for ``B / generations``
    groups of consecutive completions (see the module docstring)."""
    unscorable = torch.isnan(rewards).all(dim=1)
    total = (rewards * weights.to(rewards)).nansum(dim=1)
    total[unscorable] = float("nan")
    grouped = total.view(-1, generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(generations)
    if scale_rewards == "batch":
        std = nanstd(total).expand_as(total) if total.numel() > 1 else torch.zeros_like(total)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(generations) if generations > 1 else torch.zeros_like(total)
    advantages = total - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    advantages = torch.where(unscorable, torch.zeros_like(advantages), advantages)
    return advantages, total, torch.isclose(std, torch.zeros_like(std))


def policy_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, settings: GrpoSettings, *,
                old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                num_items: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of ``logps [B, T]`` (completion tokens, ``mask [B, T]``) and its metrics under TRL's names
    (``kl`` with ``beta > 0``, ``clip_ratio/low_mean|high_mean|region_mean``)."""
    mask = mask.to(logps.dtype)
    a = advantages.to(logps.dtype)[:, None]
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if settings.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    weight = torch.exp(log_ratio)
    clipped = torch.clamp(weight, 1 - settings.epsilon_low, 1 + settings.epsilon_up)
    per_token = -torch.min(weight * a, clipped * a)
    metrics: dict[str, float] = {}
    if settings.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if settings.use_bias_correction_kl:
            kl = kl * weight
        per_token = per_token + settings.beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    loss = _reduce(per_token, mask, settings, num_items)
    low = (weight < 1 - settings.epsilon_low) & (a < 0)
    high = (weight > 1 + settings.epsilon_up) & (a > 0)
    for name, flags in (("low_mean", low), ("high_mean", high), ("region_mean", low | high)):
        metrics[f"clip_ratio/{name}"] = _masked_mean(flags.to(logps.dtype), mask)
    return loss, metrics


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, settings: GrpoSettings,
            num_items: float | None) -> torch.Tensor:
    masked = per_token * mask
    if settings.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if settings.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if settings.loss_type == "dr_grpo":
        return masked.sum() / (per_token.shape[0] * settings.max_completion_length)
    count = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
    return masked.sum() / count.clamp(min=1.0)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    if x.shape[1] == 1:  # one value per sequence
        return float(x.mean())
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))
