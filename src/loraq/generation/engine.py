"""The decode loop: a batch of prompts, a preallocated KV cache, one prefill, then one step per token.

For prompts ``p_1 .. p_n`` (token ids) the batch is left-padded to the longest, width ``W``: row ``i`` has
``W - len(p_i)`` pad positions, masked out of attention, and its real tokens at positions
``0 .. len(p_i) - 1`` (``position = cumsum(mask) - 1``), so each row computes what it would alone. The
cache holds ``W + max(max_new_tokens)`` positions per row, allocated once (transformers' ``StaticCache``;
a model whose cache cannot be static gets a dynamic one). The prefill runs all prompts at once and keeps
only the last position's logits; each step then feeds one token per row.

A row ends at a stop token (not part of its output), when its decoded text contains one of its stop strings
(:class:`StopText`; the text is cut before it), or at its ``max_new_tokens``. A row that ends leaves the
batch: its cache rows, mask and adapter routing are dropped, and the next steps compute the others only.

Rows may use different adapters (``adapters[i]``: a loaded adapter's name, or None for the base alone;
:mod:`loraq.lora.rows`); when every row names the same one it is simply made the active adapter.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loraq.generation.sampling import Sampling, generator_for, next_tokens

# (row index in the request list, token id) -> None; called for every token a row keeps
TokenCallback = Callable[[int, int], None]


@dataclass
class Completion:
    """One row's result: the new token ids (stop token excluded) and why it ended: ``stop`` or ``length``."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str | None = None  # set by StopText: the decoded text cut before a stop string


class StopText:
    """Stop strings of a row, checked on its decoded text after each token (``decode``: ids -> text)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode, self.stops = decode, [s for s in stops if s]

    def cut(self, tokens: list[int]) -> str | None:
        """The text before the first stop string, or None while there is none."""
        if not self.stops:
            return None
        text = self.decode(tokens)
        hits = [text.find(s) for s in self.stops]
        found = [h for h in hits if h >= 0]
        return text[:min(found)] if found else None


@dataclass
class _Batch:
    """The rows still decoding: their request indices, attention mask, next positions, options, generators."""

    rows: list[int]
    mask: torch.Tensor
    positions: torch.Tensor
    options: list[Sampling]
    generators: list[torch.Generator | None]

    def keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[k] for k in keep]
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.options = [self.options[k] for k in keep]
        self.generators = [self.generators[k] for k in keep]


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], options: Sampling | Sequence[Sampling], *,
                 stop_ids: Sequence[int] = (), pad_id: int = 0, adapters: Sequence[str | None] | None = None,
                 stop_text: Sequence[StopText | None] | None = None,
                 on_token: TokenCallback | None = None) -> list[Completion]:
    """Decode every prompt (see the module docstring); one :class:`Completion` per prompt, in order."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    options = [options] * len(prompts) if isinstance(options, Sampling) else list(options)
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id)
    length = ids.shape[1] + max(o.max_new_tokens for o in options)
    batch = _Batch(list(range(len(prompts))), mask.to(device), (mask.sum(1) - 1).to(device), options,
                   [generator_for(o) for o in options])
    results = [Completion() for _ in prompts]
    with torch.no_grad(), _eval_mode(model), _routing(model, adapters) as routing:
        forward, cache = _stepper(model, len(prompts), length)
        logits = forward(ids.to(device), batch.mask, position_ids(batch.mask), prefill=True)
        while batch.rows:
            chosen = next_tokens(logits, batch.options, batch.generators).tolist()
            done = _record(chosen, batch, results, set(stop_ids), stop_text, on_token)
            if done:
                keep = [k for k in range(len(batch.rows)) if k not in done]
                _leave(keep, batch, cache, routing)
                if not keep:
                    break
                chosen = [chosen[k] for k in keep]
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
            batch.positions = batch.positions + 1
            step = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
            logits = forward(step, batch.mask, batch.positions[:, None])
    return results


def _record(chosen: list[int], batch: _Batch, results: list[Completion], stops: set[int],
            stop_text: Sequence[StopText | None] | None, on_token: TokenCallback | None) -> set[int]:
    """Append each row's token (or end it); the batch positions of the rows that ended."""
    done = set()
    for k, (row, token) in enumerate(zip(batch.rows, chosen)):
        result = results[row]
        if token in stops:
            result.finish_reason = "stop"
            done.add(k)
            continue
        result.tokens.append(token)
        checker = stop_text[row] if stop_text is not None else None
        cut = checker.cut(result.tokens) if checker is not None else None
        if cut is not None:  # the token that completes a stop string is not streamed: the text ends before it
            result.text, result.finish_reason = cut, "stop"
            done.add(k)
            continue
        if on_token is not None:
            on_token(row, token)
        if len(result.tokens) >= batch.options[k].max_new_tokens:
            done.add(k)
    return done


def _leave(keep: list[int], batch: _Batch, cache, routing) -> None:
    """Drop the rows not in ``keep`` from the batch, the cache and the adapter routing."""
    batch.keep(keep)
    if keep:
        index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        cache.reorder_cache(index)  # transformers' public row selection (beam search's): index_select per layer
        if routing is not None:
            routing.keep(keep)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [n, W]`` and ``mask [n, W]`` with every prompt ending at the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position within its own row (pads get 0: they are masked anyway)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def _stepper(model: nn.Module, rows: int, length: int):
    """``(forward(ids, mask, positions, prefill=False) -> last logits, cache)``: the lean step
    (:mod:`loraq.generation.lean`) where it applies, else transformers' forward with a static cache."""
    from loraq.generation.lean import LeanDecoder, supports

    if supports(model, length):
        decoder = LeanDecoder(model)
        cache = decoder.new_cache(rows, length)
        return (lambda ids, mask, positions, prefill=False: decoder.forward(ids, mask, positions, cache)), cache
    cache = new_cache(model, rows, length)
    return (lambda ids, mask, positions, prefill=False: _forward(model, ids, mask, positions, cache,
                                                                   prefill=prefill)), cache


def new_cache(model: nn.Module, rows: int, length: int):
    """A KV cache of ``length`` positions, allocated once (a dynamic one where the model's cannot be static)."""
    from transformers import DynamicCache, StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except Exception:  # a family whose cache transformers cannot make static: correct, only slower
        return DynamicCache(config=model.config)


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, *,
             prefill: bool = False) -> torch.Tensor:
    """The last position's logits ``[rows, V]`` in float32."""
    accepts = _parameters(type(model))
    extra = {"logits_to_keep": 1} if prefill and "logits_to_keep" in accepts else {}
    # the cache's keyword: ``cache`` since transformers 5.25 (``past_key_values`` deprecated, gone in 5.40)
    extra["cache" if "cache" in accepts else "past_key_values"] = cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    return out.logits[:, -1].float()


@functools.cache
def _parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _routing(model: nn.Module, adapters: Sequence[str | None] | None):
    """Route rows to their adapters for the block: None when there is nothing to route (no adapters given,
    or every row names the same adapter, made the active one for the block)."""
    if adapters is None:
        yield None
        return
    from loraq.lora.model import active_adapters, disable_adapters, set_adapter
    from loraq.lora.rows import RowAdapters

    names = set(adapters)
    if len(names) > 1:
        with RowAdapters(model, adapters) as routing:
            yield routing
        return
    (name,) = names
    if name is None:
        with disable_adapters(model):
            yield None
        return
    before = active_adapters(model)
    if before == [name]:
        yield None
        return
    trainable = {p: p.requires_grad for p in model.parameters()}  # set_adapter changes what trains: put it back
    set_adapter(model, name)
    try:
        yield None
    finally:
        set_adapter(model, before)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
