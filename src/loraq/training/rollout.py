"""GRPO's rollouts: ``G`` completions of each prompt, sampled in one batched decode of the model as it trains,
and the token rows the policy is scored on.

Sampling goes through the one decode loop (:func:`loraq.generation.engine.generate_ids`: KV cache, rows leave
as they end), the adapter as trained, every row with its own seeded generator: row ``j`` of step ``s`` draws
from seed ``f(run seed, s, j)``, so a resumed run samples what the uninterrupted one did, and no global
random stream moves.

A completion's tokens include the stop token that ended it (TRL's completion mask covers the first EOS: the
policy learns to stop); one cut by ``--max-completion-length`` is *truncated*. The scored rows are
``prompt + completion``, right-padded; ``labels`` mark the completion tokens (all of a truncated one's are
unmarked with ``--mask-truncated-completions``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from loraq.data.packing import Batch, collate
from loraq.data.prompt_data import PromptExample
from loraq.data.tokenize import IGNORE_INDEX, Example
from loraq.generation.engine import generate_ids
from loraq.generation.sampling import Sampling

SEED_MOD = 2 ** 62


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of completion ``row`` at ``step``: a fixed function of the three."""
    return ((seed * 1_000_003 + step) * 1_000_033 + row) % SEED_MOD


@dataclass
class Rollout:
    """``len(prompts) x G`` completions, grouped: completion ``i`` answers ``prompts[i // G]``."""

    prompts: list[PromptExample]
    generations: int
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]

    def prompt_of(self, i: int) -> PromptExample:
        return self.prompts[i // self.generations]

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) * self.generations + sum(len(c) for c in self.completion_ids)


def sample_groups(model: nn.Module, tokenizer, prompts: Sequence[PromptExample], generations: int, *,
                  max_new_tokens: int, temperature: float, top_p: float, seed: int, step: int,
                  stop_ids: Sequence[int], pad_id: int) -> Rollout:
    """Every prompt's group of completions, in one batched decode (see the module docstring)."""
    ids = [list(p.ids) for p in prompts for _ in range(generations)]
    options = [Sampling(max_new_tokens, temperature, top_p, 0, row_seed(seed, step, j)) for j in range(len(ids))]
    results = generate_ids(model, ids, options, stop_ids=stop_ids, pad_id=pad_id)
    completions = [r.tokens + ([r.stop_token] if r.stop_token is not None else []) for r in results]
    texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
    truncated = [r.stop_token is None for r in results]
    return Rollout(list(prompts), generations, completions, texts, truncated)


def scored_rows(rollout: Rollout, pad_id: int, mask_truncated: bool = False) -> Batch:
    """``prompt + completion`` per completion as one padded batch (:func:`loraq.data.packing.collate`, the one
    padding rule); labels on the completion tokens (none on a truncated one's with ``mask_truncated``).
    ``batch.num_trained_tokens`` is the completion tokens scored."""
    examples = []
    for i, completion in enumerate(rollout.completion_ids):
        prompt = list(rollout.prompt_of(i).ids)
        scored = [IGNORE_INDEX] * len(completion) if mask_truncated and rollout.truncated[i] else completion
        examples.append((Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + scored),))
    return collate(examples, pad_id, packed=False)
