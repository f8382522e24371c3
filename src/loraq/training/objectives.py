"""The objective a run optimises, as the loop sees it: SFT's token-mean loss, or DPO / ORPO on pairs.

Each has ``counts(micro)`` (what the step's micro-batch sums are divided by),
``loss(loss_module, batch, counts)``, ``step_metrics()`` (extra numbers for
the step's metrics line), ``validate(...)`` (an evaluation result) and
``write_state(folder)`` / ``read_state(folder)`` (its own part of a checkpoint).
:func:`make_objective` builds the run's, computing (or reading back) the DPO
reference log-probabilities first (:mod:`loraq.training.reference`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraq.training.evaluate import EvalLoss, validation_loss
from loraq.training.objective import batch_loss
from loraq.training.preference import PreferenceObjective
from loraq.training.reference import (
    ReferenceLogps,
    compute_reference,
    fingerprint,
    frozen_adapter_context,
    load_cache,
    reference_context,
    save_cache,
    visited_pairs,
)


class SFTObjective:
    """Next-token cross-entropy: each micro-batch's summed loss over the global batch's trained tokens."""

    name = "sft"
    reference: ReferenceLogps | None = None

    def counts(self, micro: list) -> int:
        return max(1, sum(b.global_trained_tokens for b in micro))

    def loss(self, loss_module: nn.Module, batch, counts: int) -> torch.Tensor:
        return batch_loss(loss_module, batch, counts)

    def step_metrics(self) -> dict[str, float]:
        return {}

    def validate(self, loss_module: nn.Module, batches, device: torch.device, runtime) -> EvalLoss | None:
        return validation_loss(loss_module, batches, device, runtime)

    def save_reference(self, run_dir: Path) -> None:
        """Nothing to cache."""

    def write_state(self, folder: Path) -> None:
        """Nothing beyond what every checkpoint holds (GRPO keeps its reused groups here)."""

    def read_state(self, folder: Path) -> None:
        """Nothing to read back."""


class RunPreferenceObjective(PreferenceObjective):
    """:class:`PreferenceObjective` with the run's reference cache (written once, after the run folder is claimed)."""

    write_state = SFTObjective.write_state
    read_state = SFTObjective.read_state

    def __init__(self, *args, cache_key: str | None = None, unsaved: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_key, self.unsaved = cache_key, unsaved

    def save_reference(self, run_dir: Path) -> None:
        if self.unsaved and self.reference is not None and self.cache_key is not None:
            save_cache(run_dir, self.reference, self.cache_key)
            self.unsaved = False


def make_objective(cfg: Any, loss_module: nn.Module, model: nn.Module, data, run_dir: Path, total_steps: int,
                   device: torch.device, say: Callable[[str], None], resume: bool = False, tokenizer=None,
                   rewards: list | None = None):
    """The run's objective; for DPO and ORPO the reference (or, ORPO, only the validation pairs' base scores),
    read back from the run folder when resuming."""
    if cfg.objective == "sft":
        return SFTObjective()
    if cfg.objective == "grpo":
        return make_grpo_objective(cfg, loss_module, model, tokenizer, rewards)
    fresh = cfg.method != "full" and not cfg.init_adapter and cfg.init in ("default", "gaussian")
    needed = (visited_pairs(len(data.train), cfg.batch_size, total_steps * cfg.grad_accum, cfg.seed)
              if cfg.objective == "dpo" else [])
    key = fingerprint(cfg, data)
    reference = load_cache(run_dir, key, (len(data.train), len(data.val))) if resume else None
    unsaved = reference is None
    if reference is None:
        how = "the adapter switched off" if fresh else "the model as it starts"
        say(f"loraq: reference log-probabilities ({how}) of {len(needed)} training and {len(data.val)} validation "
            f"pairs, once ...")
        reference = compute_reference(loss_module, reference_context(model, fresh), data, needed, cfg.batch_size,
                                      device)
    else:
        say(f"loraq: reference log-probabilities read back from {run_dir.name}/reference_logps.safetensors")
    base = reference.base_preference_accuracy()
    if base is not None:
        say(f"loraq: base preference accuracy {base:.1%} on {len(data.val)} validation pairs")
    return RunPreferenceObjective(cfg.objective, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                  orpo_lambda=cfg.orpo_lambda, train_on_inputs=cfg.train_on_inputs,
                                  reference=reference, cache_key=key, unsaved=unsaved)


def make_grpo_objective(cfg: Any, loss_module: nn.Module, model: nn.Module, tokenizer, rewards: list | None = None):
    """GRPO with the run's rewards and sampling settings; the reference (``--beta`` > 0) is the adapter off, or
    with ``--init-adapter`` the adapter it continues, frozen."""
    from loraq.data.prompts import pad_token_id, stop_token_ids
    from loraq.training.grpo import GrpoSettings
    from loraq.training.grpo_run import Generation, GrpoObjective
    from loraq.training.rewards import load_rewards

    settings = GrpoSettings(beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                            loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
                            importance_sampling_level=cfg.importance_sampling_level,
                            max_completion_length=cfg.max_completion_length)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    generation = Generation(tokenizer, stops, pad_token_id(tokenizer, stops), cfg.max_completion_length,
                            cfg.temperature, cfg.top_p, cfg.seed)
    rewards = load_rewards(cfg.reward) if rewards is None else rewards
    return GrpoObjective(model, loss_module, settings, rewards, list(cfg.reward_weights),
                         cfg.num_generations, generation, num_iterations=cfg.num_iterations,
                         mask_truncated=cfg.mask_truncated_completions,
                         reference_context=frozen_adapter_context(model) if cfg.init_adapter and cfg.beta
                         else reference_context(model, True))
