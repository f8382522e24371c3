"""GRPO as the loop sees it (``--objective grpo``): each step samples, scores and learns.

    counts(micro):  for each micro-batch of prompts: G completions each (:mod:`loraq.training.rollout`), the
                    rewards (:mod:`loraq.training.rewards`), the group advantages (:mod:`loraq.training.grpo`);
                    the old policy's log-probabilities when a batch is reused (``--num-iterations`` > 1) and the
                    reference's (adapter off) with ``--beta`` > 0; returns the step's completion tokens
                    (the ``dapo`` loss's denominator)
    loss(batch):    the policy's per-token log-probabilities (:class:`~loraq.training.logps.TokenLogps`) and the
                    clipped loss of that micro-batch
    step_metrics(): TRL's names -- ``reward``, ``reward_std``, ``rewards/<name>/mean|std``,
                    ``frac_reward_zero_std``, ``completions/mean_length|min_length|max_length|clipped_ratio``,
                    ``kl``, ``entropy``, ``clip_ratio/*`` -- and where the step's time went (``time/generation_share``,
                    ``time/scoring_share``, ``time/training_share``)
    validate():     greedy completions of the held-out prompts, scored: ``reward`` and ``success`` (the share
                    whose every reward function gave its maximum, 1)

With ``--num-iterations k`` the iterator hands each batch of prompts out ``k`` times in a row; the first time
it is sampled, the next ``k - 1`` steps reuse its completions with the log-probabilities they were sampled
under (so the importance weights and clipping act).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraq.data.packing import Batch
from loraq.data.prompt_data import PromptBatch, PromptExample
from loraq.data.tokenize import IGNORE_INDEX
from loraq.generation.engine import eval_mode
from loraq.training.evaluate import EvalLoss
from loraq.training.grpo import GrpoSettings, group_advantages, nanstd, policy_loss
from loraq.training.rewards import Reward, score
from loraq.training.rollout import Rollout, sample_groups, scored_rows

GROUPS_FILE = "grpo_groups.safetensors"  # in a checkpoint: the groups a later step trains on again


@dataclass
class GroupBatch:
    """One micro-batch's rollout, its rows, rewards and advantages (and old / reference log-probabilities)."""

    rollout: Rollout
    rows: Batch  # prompt + completion per completion, labels on the completion
    rewards: torch.Tensor  # [B, F], NaN: not scored
    total: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]
    std_zero: torch.Tensor  # [B] bool
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    uses: int = 0  # steps that have trained on it (at most --num-iterations)


@dataclass
class GrpoEval(EvalLoss):
    """Held-out prompts, greedy: ``metrics`` holds ``reward``, ``success`` and each reward's mean."""

    metrics: dict[str, float] = field(default_factory=dict)
    sample: str = ""  # the first held-out prompt's completion

    @property
    def perplexity(self) -> float:
        return float("nan")


@dataclass
class Generation:
    """How completions are sampled: the engine's stop and pad tokens and the run's sampling settings."""

    tokenizer: object
    stop_ids: list[int]
    pad_id: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


class GrpoObjective:
    name = "grpo"
    reference = None

    def __init__(self, model: nn.Module, loss_module: nn.Module, settings: GrpoSettings, rewards: list[Reward],
                 weights: list[float], generations: int, generation: Generation, *, num_iterations: int = 1,
                 mask_truncated: bool = False, reference_context: Callable[[], contextlib.AbstractContextManager]):
        self.model, self._loss_module, self.settings, self.rewards = model, loss_module, settings, rewards
        self.weights = torch.tensor(weights or [1.0] * len(rewards), dtype=torch.float64)
        self.generations, self.generation = generations, generation
        self.num_iterations, self.mask_truncated = num_iterations, mask_truncated
        self.reference_context = reference_context
        self.step = 0
        self._groups: dict[tuple, GroupBatch] = {}
        self._saved: dict[tuple, tuple[dict[str, torch.Tensor], dict]] = {}  # read back from a checkpoint
        self._current: list[GroupBatch] = []
        self._by_batch: dict[int, GroupBatch] = {}  # this step's micro-batches (by object) -> their groups
        self._loss_metrics: list[dict[str, float]] = []
        self._times = {"generation": 0.0, "scoring": 0.0}
        self._t_step = 0.0

    # -- the step ---------------------------------------------------------------------------------------------
    def counts(self, micro: list[PromptBatch]) -> float:
        """Sample and score each micro-batch (or reuse it), then the step's completion-token count."""
        self.step += 1
        self._t_step = time.perf_counter()
        self._times = {"generation": 0.0, "scoring": 0.0}
        groups, fresh = [], []
        for k, batch in enumerate(micro):
            key = (k, tuple(batch.index))
            group = self._groups.get(key) or self._restore(key, batch.examples)
            if group is None or group.uses >= self.num_iterations:
                group = self._sample(batch.examples, k)
                fresh.append(group)
            group.uses += 1
            batch.num_tokens = group.rollout.num_tokens
            groups.append(group)
        if self.settings.scale_rewards == "batch" and len(fresh) > 1:
            self._scale_over_the_batch(fresh)
        self._groups = {(k, tuple(b.index)): g for k, (b, g) in enumerate(zip(micro, groups))}
        self._current, self._loss_metrics = groups, []
        self._by_batch = {id(b): g for b, g in zip(micro, groups)}
        return float(max(1, sum(g.rows.num_trained_tokens for g in groups)))

    def _sample(self, examples: list[PromptExample], micro_index: int) -> GroupBatch:
        gen, t0 = self.generation, time.perf_counter()
        rollout = sample_groups(self.model, gen.tokenizer, examples, self.generations,
                                max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                seed=gen.seed, step=self.step * 1024 + micro_index, stop_ids=gen.stop_ids,
                                pad_id=gen.pad_id)
        t1 = time.perf_counter()
        rewards = self.score(rollout)
        t2 = time.perf_counter()
        self._times["generation"] += t1 - t0
        self._times["scoring"] += t2 - t1
        group = self._group(rollout, rewards)
        if self.num_iterations > 1 or self.settings.beta != 0.0:
            self._score_old_and_reference(group)
        return group

    def _group(self, rollout: Rollout, rewards: torch.Tensor) -> GroupBatch:
        advantages, total, std_zero = group_advantages(rewards, self.weights, self.generations,
                                                       self.settings.scale_rewards)
        rows = scored_rows(rollout, self.generation.pad_id, self.mask_truncated)
        return GroupBatch(rollout, rows, rewards, total, advantages, std_zero)

    # -- a checkpoint between two uses of a batch (--num-iterations > 1) -----------------------------------------
    def write_state(self, folder: Path) -> None:
        """The groups a later step trains on again -- completions, rewards, the old and reference
        log-probabilities, uses -- into ``folder``/:data:`GROUPS_FILE` (nothing when there are none)."""
        from safetensors.torch import save_file

        tensors, meta = {}, []
        live = [(key, g) for key, g in self._groups.items() if g.uses < self.num_iterations]
        for n, ((micro, index), g) in enumerate(live):
            ids = g.rollout.completion_ids
            tensors[f"{n}.completion_ids"] = torch.tensor([t for c in ids for t in c], dtype=torch.long)
            tensors[f"{n}.lengths"] = torch.tensor([len(c) for c in ids], dtype=torch.long)
            tensors[f"{n}.truncated"] = torch.tensor(g.rollout.truncated, dtype=torch.bool)
            tensors[f"{n}.rewards"] = g.rewards
            tensors[f"{n}.advantages"] = g.advantages
            tensors[f"{n}.std_zero"] = g.std_zero
            for name in ("old_logps", "ref_logps"):
                if getattr(g, name) is not None:
                    tensors[f"{n}.{name}"] = getattr(g, name).contiguous()
            meta.append({"micro": micro, "index": list(index), "uses": g.uses, "texts": g.rollout.texts})
        if meta:
            save_file(tensors, str(folder / GROUPS_FILE), metadata={"groups": json.dumps(meta)})

    def read_state(self, folder: Path) -> None:
        """What :meth:`write_state` wrote, kept until the iterator hands out those batches again."""
        from safetensors import safe_open

        path = folder / GROUPS_FILE
        if not path.is_file():
            return
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["groups"])
            for n, entry in enumerate(meta):
                tensors = {k.split(".", 1)[1]: fh.get_tensor(k) for k in fh.keys() if k.startswith(f"{n}.")}
                self._saved[(entry["micro"], tuple(entry["index"]))] = (tensors, entry)

    def _restore(self, key: tuple, examples: list[PromptExample]) -> GroupBatch | None:
        if key not in self._saved:
            return None
        tensors, entry = self._saved.pop(key)
        ids = [c.tolist() for c in tensors["completion_ids"].split(tensors["lengths"].tolist())]
        rollout = Rollout(list(examples), self.generations, ids, entry["texts"], tensors["truncated"].tolist())
        group = self._group(rollout, tensors["rewards"])
        group.advantages, group.std_zero = tensors["advantages"], tensors["std_zero"]  # as scaled when sampled
        group.old_logps, group.ref_logps = tensors.get("old_logps"), tensors.get("ref_logps")
        group.uses = entry["uses"]
        return group

    def _scale_over_the_batch(self, fresh: list[GroupBatch]) -> None:
        """``--scale-rewards batch`` over every completion sampled this step (TRL: the generation batch, all
        micro-batches of the step), not each micro-batch's own."""
        rewards = torch.cat([g.rewards for g in fresh])
        advantages, _, std_zero = group_advantages(rewards, self.weights, self.generations, "batch")
        for g, a, z in zip(fresh, advantages.split([len(g.rewards) for g in fresh]),
                           std_zero.split([len(g.rewards) for g in fresh])):
            g.advantages, g.std_zero = a, z

    def score(self, rollout: Rollout) -> torch.Tensor:
        """``[completions, rewards]`` (NaN: not scored) from the reward functions, called as TRL calls them."""
        prompts = [rollout.prompt_of(i).prompt for i in range(len(rollout.texts))]
        chat = isinstance(rollout.prompts[0].prompt, list)
        completions = [[{"role": "assistant", "content": t}] if chat else t for t in rollout.texts]
        names = sorted({k for p in rollout.prompts for k in p.columns})
        columns = {k: [rollout.prompt_of(i).columns.get(k) for i in range(len(prompts))] for k in names}
        where = [rollout.prompt_of(i).where for i in range(len(prompts))]
        table = score(self.rewards, prompts, completions, rollout.completion_ids, columns, where)
        return torch.tensor(table, dtype=torch.float64)

    def _score_old_and_reference(self, group: GroupBatch) -> None:
        """The sampling policy's log-probabilities (reused batches) and the reference's (``beta`` > 0)."""
        loss_module = self._loss_module
        rows = group.rows
        with torch.no_grad(), eval_mode(loss_module):
            if self.num_iterations > 1:
                group.old_logps = self._logps(loss_module, rows).detach()
            if self.settings.beta != 0.0:
                with self.reference_context():
                    group.ref_logps = self._logps(loss_module, rows).detach()

    def _logps(self, loss_module: nn.Module, rows: Batch, entropy: bool = False):
        device = next(loss_module.parameters()).device
        r = rows.to(device)
        return loss_module(r.input_ids, r.labels, r.position_ids, r.attention_mask,
                           temperature=self.generation.temperature, entropy=entropy)

    def loss(self, loss_module: nn.Module, batch: PromptBatch, counts: float) -> torch.Tensor:
        """This micro-batch's share of the step's loss (``dapo``: over the step's completion tokens; the other
        types: their own reduction, weighted by this micro-batch's share of the step's completions)."""
        group = self._by_batch[id(batch)]
        logps, entropy = self._logps(loss_module, group.rows, entropy=True)
        device = logps.device
        scored = (group.rows.labels != IGNORE_INDEX).to(device)
        loss, metrics = policy_loss(logps, group.advantages.to(device), scored, self.settings,
                                    old_logps=None if group.old_logps is None else group.old_logps.to(device),
                                    ref_logps=None if group.ref_logps is None else group.ref_logps.to(device),
                                    num_items=counts)
        metrics["entropy"] = float(entropy[scored].mean()) if scored.any() else float("nan")
        self._loss_metrics.append(metrics)
        if self.settings.loss_type != "dapo":
            share = len(group.rollout.texts) / sum(len(g.rollout.texts) for g in self._current)
            loss = loss * share
        return loss

    def step_metrics(self) -> dict[str, float]:
        """The step's metrics under TRL's names (see the module docstring)."""
        groups = self._current
        out = reward_metrics(torch.cat([g.rewards for g in groups]), torch.cat([g.total for g in groups]),
                             torch.cat([g.std_zero for g in groups]), [r.name for r in self.rewards])
        out.update(completion_metrics([c for g in groups for c in g.rollout.completion_ids],
                                      [t for g in groups for t in g.rollout.truncated]))
        for name in sorted({k for m in self._loss_metrics for k in m}):
            values = [m[name] for m in self._loss_metrics if name in m]
            out[name] = sum(values) / len(values)
        total = max(time.perf_counter() - self._t_step, 1e-9)
        out["time/generation_share"] = self._times["generation"] / total
        out["time/scoring_share"] = self._times["scoring"] / total
        out["time/training_share"] = max(0.0, 1 - out["time/generation_share"] - out["time/scoring_share"])
        return out

    # -- held-out prompts -------------------------------------------------------------------------------------
    def validate(self, loss_module: nn.Module, batches, device: torch.device, runtime=None) -> GrpoEval | None:
        """Greedy completions of the held-out prompts, scored by the run's rewards (RNG untouched)."""
        examples = [e for b in batches() for e in b.examples]
        return self.evaluate_prompts(examples)

    def evaluate_prompts(self, examples: list[PromptExample]) -> GrpoEval | None:
        if not examples:
            return None
        gen = self.generation
        rollout = sample_groups(self.model, gen.tokenizer, examples, 1, max_new_tokens=gen.max_new_tokens,
                                temperature=0.0, top_p=1.0, seed=0, step=0, stop_ids=gen.stop_ids,
                                pad_id=gen.pad_id)
        rewards = self.score(rollout)
        total = (torch.nan_to_num(rewards) * self.weights).sum(1)
        success = (rewards >= 1.0).all(1).double().mean()
        metrics = {"reward": float(total.mean()), "success": float(success)}
        for j, reward in enumerate(self.rewards):
            metrics[f"rewards/{reward.name}/mean"] = float(torch.nanmean(rewards[:, j]))
        return GrpoEval(loss=-metrics["reward"], tokens=len(examples), metrics=metrics, sample=rollout.texts[0])

    def save_reference(self, run_dir) -> None:
        """Nothing to cache: the reference is the adapter switched off, scored as each batch is sampled."""


def reward_metrics(rewards: torch.Tensor, total: torch.Tensor, std_zero: torch.Tensor,
                   names: list[str]) -> dict[str, float]:
    """As TRL 1.16 logs them: ``reward`` and ``reward_std``, the mean and sample std (NaN skipped) of the weighted
    totals over the step's completions; each function's mean and std over the completions it scored; and
    ``frac_reward_zero_std`` (completions whose group had one reward: no signal). A std of fewer than two values
    is NaN, as in TRL."""
    out = {"reward": _nanmean(total), "reward_std": _finite(nanstd(total.double())),
           "frac_reward_zero_std": float(std_zero.double().mean())}
    for j, name in enumerate(names):
        column = rewards[:, j].double()
        out[f"rewards/{name}/mean"] = _nanmean(column)
        out[f"rewards/{name}/std"] = _finite(nanstd(column))
    return out


def _finite(x: torch.Tensor) -> float:
    value = float(x)
    return value if math.isfinite(value) else float("nan")


def _nanmean(x: torch.Tensor) -> float:
    return _finite(torch.nanmean(x.double())) if x.numel() else float("nan")


def completion_metrics(completions: list[list[int]], truncated: list[bool]) -> dict[str, float]:
    lengths = [len(c) for c in completions]
    return {"completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": float(min(lengths)),
            "completions/max_length": float(max(lengths)),
            "completions/clipped_ratio": sum(truncated) / len(truncated)}
