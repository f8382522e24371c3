"""Evaluation: loss / perplexity over a dataset, and exact-match accuracy.

* :func:`validation_loss`: the token-mean loss over held-out batches, split
  across ranks, without disturbing the training run's random stream.
* :func:`exact_match`: the prompt (chat messages without the final answer,
  or a completion prompt) is rendered as in training, the model continues it
  greedily, and the prediction counts when ``prediction.strip() ==
  reference.strip()``. Generation is batched with left padding.
* :func:`evaluate_dataset`: both, for a data file (``loraq eval``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraq.data.packing import Batch
from loraq.data.references import EvalReference
from loraq.distributed.runtime import Runtime
from loraq.training.objective import CausalLMLoss, batch_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class EvalLoss:
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def evaluate_loss(loss_sum_fn: Callable[[Batch], tuple[torch.Tensor, int]],
                  batches: Iterable[Batch]) -> EvalLoss | None:
    """``loss_sum_fn(batch) -> (summed token loss, trained token count)``; mean over all tokens."""
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_sum_fn(batch)
        total += float(s)
        count += int(n)
    if count == 0:
        return None
    return EvalLoss(loss=total / count, tokens=count)


def generate_batch(model, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int,
                   stop_token_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuation of each tokenised prompt, all in one batch (:mod:`loraq.generation.engine`); new
    tokens only, up to the first stop token."""
    from loraq.generation.engine import generate_ids
    from loraq.generation.sampling import Sampling

    results = generate_ids(model, prompts, Sampling(max_new_tokens=max_new_tokens), stop_ids=stop_token_ids,
                           pad_id=pad_id)
    return [r.tokens for r in results]


@dataclass
class ExactMatch:
    accuracy: float
    n: int
    predictions: list[str]


def exact_match(model: nn.Module, tokenizer: PreTrainedTokenizerBase, references: Sequence[EvalReference],
                max_new_tokens: int, batch_size: int = 64) -> ExactMatch:
    """``references``: :class:`loraq.data.references.EvalReference` (``prompt_ids``, ``answer``).

    A prediction is the decoded continuation up to the first stop token (:mod:`loraq.data.prompts`, the
    rule ``loraq generate`` follows); it counts when it equals the answer after stripping whitespace at
    both ends.
    """
    from loraq.data.prompts import pad_token_id, stop_token_ids
    from loraq.data.references import exact_match as same

    if not references:
        return ExactMatch(accuracy=0.0, n=0, predictions=[])
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id, stops = pad_token_id(tokenizer, stop_ids), set(stop_ids)
    order = sorted(range(len(references)), key=lambda i: len(references[i].prompt_ids))  # similar lengths batch well
    predictions: list[str] = [""] * len(references)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = generate_batch(model, [references[i].prompt_ids for i in chunk], max_new_tokens, pad_id, stop_ids)
        for i, new in zip(chunk, outs):
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            predictions[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    hits = sum(same(p, r.answer) for p, r in zip(predictions, references))
    return ExactMatch(accuracy=hits / len(references), n=len(references), predictions=predictions)


def evaluate_dataset(model, tokenizer, path: str, *, fmt: str = "auto", seq_len: int = 2048, batch_size: int = 8,
                     max_examples: int = 200, train_on_inputs: bool = False) -> dict[str, Any]:
    """Loss/perplexity over every example of ``path`` and exact match on up to ``max_examples`` references."""
    from loraq.config import TrainConfig
    from loraq.data.dataset import build_data

    cfg = TrainConfig(data=str(path), format=fmt, seq_len=seq_len, batch_size=batch_size, eval_samples=max_examples,
                      train_on_inputs=train_on_inputs)
    data = build_data(cfg, tokenizer)
    loss_module = CausalLMLoss(model)
    device = next(model.parameters()).device
    from loraq.data.batches import ordered_batches

    def loss_sum(batch):
        batch = batch.to(device)
        return batch_loss(loss_module, batch, 1.0), batch.num_trained_tokens

    result = evaluate_loss(loss_sum, ordered_batches(data.train, batch_size, data.pad_id, False))
    em = exact_match(model, tokenizer, data.references, data.max_answer_tokens) if data.references else None
    return {"data": str(path), "format": data.format, "examples": data.stats.train.examples,
            "tokens": 0 if result is None else result.tokens,
            "loss": None if result is None else result.loss,
            "perplexity": None if result is None else result.perplexity,
            "exact_match": None if em is None else em.accuracy,
            "exact_match_examples": 0 if em is None else em.n}


def validation_loss(loss_module: nn.Module, batches: Callable[[], Iterable[Batch]], device: torch.device,
                    runtime: Runtime) -> EvalLoss | None:
    """Token-mean loss over ``batches()``; rank r takes batches r, r + N, ... (every rank runs the same number
    of forwards, as FSDP gathers weights in each: the ones past the end repeat the last batch and count nothing)."""
    was = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    rng = torch.get_rng_state()  # evaluation must not shift the training run's random stream
    all_batches = list(batches())
    rounds = math.ceil(len(all_batches) / runtime.world_size)
    try:
        with torch.no_grad():
            for k in range(rounds):
                index = k * runtime.world_size + runtime.rank
                batch = all_batches[min(index, len(all_batches) - 1)].to(device)
                loss = float(batch_loss(loss_module, batch, 1.0))
                if index < len(all_batches):
                    total += loss
                    count += batch.num_trained_tokens
    finally:
        torch.set_rng_state(rng)
        loss_module.train(was)
    total, count = runtime.sum(total), runtime.sum(count)
    return EvalLoss(loss=total / count, tokens=int(count)) if count else None


def exact_match_during_training(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                                references: Sequence[EvalReference],
                                max_new_tokens: int,
                                loss_module: nn.Module | None = None) -> ExactMatch:
    """:func:`exact_match` inside a run: the RNG stream untouched, FSDP's shards gathered so ranks generate in step."""
    from loraq.distributed.wrap import gathered_for_inference

    rng = torch.get_rng_state()
    try:
        with gathered_for_inference(loss_module):
            return exact_match(model, tokenizer, references, max_new_tokens=max_new_tokens)
    finally:
        torch.set_rng_state(rng)
