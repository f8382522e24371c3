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

:class:`DecodeBatch` is the loop's state, for callers that add rows while others decode (the server's
continuous batching): rows :meth:`~DecodeBatch.join` between steps. On the lean step the new rows are
prefilled alone and their cache is merged into the running one, both left-padded to the wider
(:meth:`loraq.generation.lean.LeanCache.join`); on transformers' forward the cache is rebuilt from every row's
context. A row decodes the same tokens whichever rows it shares a batch with (up to floating-point ties).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loraq.generation.sampling import Sampling, generator_for, next_tokens

# (row key -- the index in generate_ids' prompts --, token id) -> None; called for every token a row keeps
TokenCallback = Callable[[int, int], None]


@dataclass
class Completion:
    """One row's result: the new token ids (stop token excluded) and why it ended: ``stop`` or ``length``."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str | None = None  # set by StopText: the decoded text cut before a stop string
    stop_token: int | None = None  # the stop token that ended it (not in ``tokens``), if one did
    # with Row.top_logprobs: per token (id, log-probability, [(id, log-probability) of the most likely])
    logprobs: list | None = None


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
class Row:
    """One sequence being decoded: its caller's ``key``, prompt ids, options and what it has produced so far.

    ``route``: the adapters it uses (:data:`loraq.lora.rows.Route`; empty: the base alone); ``top_logprobs``:
    ``None`` for no log-probabilities, else how many of the most likely tokens to record beside each one chosen.
    """

    key: Hashable
    prompt: list[int]
    options: Sampling
    stop_text: StopText | None = None
    route: tuple = ()
    top_logprobs: int | None = None
    ignore_stop_ids: bool = False  # only max_new_tokens and stop strings end it (a benchmark's fixed length)
    result: Completion = field(default_factory=Completion)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.generator = generator_for(self.options)

    @property
    def remaining(self) -> int:
        return self.options.max_new_tokens - len(self.result.tokens)


class DecodeBatch:
    """Rows decoding together. :meth:`join` prefills new rows (between steps: continuous batching),
    :meth:`step` chooses one token per row and computes the next logits, rows that end or are
    :meth:`drop`-ped leave. State between steps: ``mask [rows, filled]`` (1 = a real token), ``logits
    [rows, V]`` of each row's next token; a row's next position is ``mask.sum(1)`` (its real tokens so far)."""

    def __init__(self, model: nn.Module, *, stop_ids: Sequence[int] = (), pad_id: int = 0, routing=None,
                 on_token: TokenCallback | None = None, length: int | None = None):
        self.model, self.stops, self.pad_id = model, set(stop_ids), pad_id
        self.routing, self.on_token = routing, on_token
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.mask = self.logits = None
        self.steps = _steps_for(model, length)  # length: the longest context a row will reach

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` and add them to the batch; the next :meth:`step` chooses their first tokens."""
        if not rows:
            return
        if any(len(r.prompt) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        logits, mask = self.steps.join(self, list(rows))
        self.rows += rows
        self.logits, self.mask = logits, mask.to(self.device)
        self.route([r.route for r in self.rows])

    def step(self) -> list[Row]:
        """One token for every row; the rows that ended (and left the batch) with it."""
        chosen = next_tokens(self.logits, [r.options for r in self.rows], [r.generator for r in self.rows]).tolist()
        if any(r.top_logprobs is not None for r in self.rows):
            _record_logprobs(self.logits, chosen, self.rows)
        done = _record(chosen, self.rows, self.stops, self.on_token)
        ended = [self.rows[k] for k in sorted(done)]
        keep = [k for k in range(len(self.rows)) if k not in done]
        if done:
            self._keep(keep)
        if self.rows:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            step = torch.tensor([chosen[k] for k in keep], dtype=torch.long, device=self.device)[:, None]
            self.logits = self.steps.forward(step, self.mask, (self.mask.sum(1) - 1)[:, None])
        return ended

    def drop(self, keys: set) -> list[Row]:
        """Remove the rows whose key is in ``keys`` (a caller that went away); the rows removed."""
        gone = [r for r in self.rows if r.key in keys]
        if gone:
            self._keep([k for k, r in enumerate(self.rows) if r.key not in keys])
        return gone

    def route(self, routes: list) -> None:
        if self.routing is not None:
            self.routing.set(routes)

    def _keep(self, keep: list[int]) -> None:
        """Only the rows at ``keep`` stay: in the list, the mask, the logits, the cache and the routing."""
        self.rows = [self.rows[k] for k in keep]
        if not keep:
            self.mask = self.logits = None
            self.steps.reset()
            self.route([])
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask, self.logits = self.mask.index_select(0, index), self.logits.index_select(0, index)
        self.steps.keep(index)
        self.route([r.route for r in self.rows])


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], options: Sampling | Sequence[Sampling], *,
                 stop_ids: Sequence[int] = (), pad_id: int = 0, adapters: Sequence[str | None] | None = None,
                 stop_text: Sequence[StopText | None] | None = None,
                 on_token: TokenCallback | None = None) -> list[Completion]:
    """Decode every prompt (see the module docstring); one :class:`Completion` per prompt, in order."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    options = [options] * len(prompts) if isinstance(options, Sampling) else list(options)
    checkers = stop_text if stop_text is not None else [None] * len(prompts)
    with torch.no_grad(), eval_mode(model), _routing(model, adapters) as routing:
        from loraq.lora.rows import as_route

        rows = [Row(i, list(p), o, c, as_route(adapters[i]) if routing is not None else ())
                for i, (p, o, c) in enumerate(zip(prompts, options, checkers))]
        length = max(len(p) for p in prompts) + max(o.max_new_tokens for o in options)
        batch = DecodeBatch(model, stop_ids=stop_ids, pad_id=pad_id, routing=routing, on_token=on_token,
                            length=length)
        batch.join(rows)
        while batch.rows:
            batch.step()
    return [r.result for r in rows]


def _record(chosen: list[int], rows: list[Row], stops: set[int], on_token: TokenCallback | None) -> set[int]:
    """Append each row's token (or end it); the batch positions of the rows that ended."""
    done = set()
    for k, (row, token) in enumerate(zip(rows, chosen)):
        result = row.result
        if token in stops and not row.ignore_stop_ids:
            result.finish_reason, result.stop_token = "stop", token
            done.add(k)
            continue
        result.tokens.append(token)
        cut = row.stop_text.cut(result.tokens) if row.stop_text is not None else None
        if cut is not None:  # the token that completes a stop string is not streamed: the text ends before it
            result.text, result.finish_reason = cut, "stop"
            done.add(k)
            continue
        if on_token is not None:
            on_token(row.key, token)
        if row.remaining <= 0:
            done.add(k)
    return done


def _record_logprobs(logits: torch.Tensor, chosen: list[int], rows: list[Row]) -> None:
    """``log softmax`` of the model's logits (before temperature and filtering) at each chosen token, and the
    ``top_logprobs`` most likely tokens, appended to the rows that asked (``result.logprobs``)."""
    for k, row in enumerate(rows):
        if row.top_logprobs is None:
            continue
        lp = torch.log_softmax(logits[k].float(), -1)
        top = torch.topk(lp, row.top_logprobs) if row.top_logprobs > 0 else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        if row.result.logprobs is None:
            row.result.logprobs = []
        row.result.logprobs.append((chosen[k], float(lp[chosen[k]]), alternatives))


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


def _steps_for(model: nn.Module, length: int | None):
    """The lean step (:mod:`loraq.generation.lean`) where it applies to contexts of ``length`` (None: the
    model's longest), else transformers' forward."""
    from loraq.generation.lean import LeanDecoder, supports

    length = length or getattr(model.config, "max_position_embeddings", None) or 1 << 30
    return _LeanSteps(model, LeanDecoder(model)) if supports(model, length) else _ModelSteps(model)


class _LeanSteps:
    """Rows join by a prefill of their own, merged into the running cache (:meth:`LeanCache.join`)."""

    def __init__(self, model: nn.Module, decoder):
        self.model, self.decoder, self.cache = model, decoder, None

    def join(self, batch: DecodeBatch, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and mask of the batch with ``rows`` added after its own. Rows with the same prompt and
        adapters (GRPO's groups, a request's ``n`` choices) are prefilled once and their cache rows copied."""
        first: dict[tuple, int] = {}
        copy_of = [first.setdefault((tuple(r.prompt), r.route), len(first)) for r in rows]
        unique = [rows[copy_of.index(u)] for u in range(len(first))]
        device = batch.device
        cache, logits, mask = self._prefill(batch, unique, max(r.remaining for r in rows))
        if len(unique) < len(rows):
            index = torch.tensor(copy_of, dtype=torch.long)
            cache.reorder_cache(index.to(device))
            logits, mask = logits.index_select(0, index.to(logits.device)), mask.index_select(0, index)
        if not batch.rows:
            self.cache = cache
            return logits, mask
        room = max(r.remaining for r in batch.rows + rows)
        self.cache, merged = self.cache.join(batch.mask, cache, mask.to(device), room)
        return torch.cat([batch.logits, logits]), merged

    def _prefill(self, batch: DecodeBatch, rows: list[Row], room: int):
        """(cache, last logits, mask) of ``rows`` (distinct prompts) with ``room`` free columns after them.

        Rows on one route whose prompts open alike (a chat template's system turn) compute that shared prefix
        once, on one row, whose cache is then copied to every row; each row's rest follows it, left-padded:
        columns ``[0, P)`` hold the prefix (positions ``0 .. P-1``), then pads, then the row's own tokens
        (positions from ``P``). Attention goes by the mask, so the gap changes nothing a row computes."""
        prompts, device = [r.prompt for r in rows], batch.device
        shared = _shared_prefix(prompts) if len({r.route for r in rows}) == 1 else 0
        ids, mask = left_padded([p[shared:] for p in prompts], batch.pad_id)
        cache = self.decoder.new_cache(1 if shared else len(rows), shared + ids.shape[1] + room)
        if shared:
            batch.route([rows[0].route])
            head = torch.tensor([prompts[0][:shared]], dtype=torch.long)
            ones = torch.ones_like(head)
            self.decoder.forward(head.to(device), ones.to(device), position_ids(ones).to(device), cache)
            cache.reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=device))
            mask = torch.cat([ones.expand(len(rows), -1), mask], dim=1)
        batch.route([r.route for r in rows])
        positions = position_ids(mask)[:, shared:]
        logits = self.decoder.forward(ids.to(device), mask.to(device), positions.to(device), cache)
        return cache, logits, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder.forward(ids, mask, positions, self.cache)

    def keep(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)

    def reset(self) -> None:
        self.cache = None


# a prefix is computed once for all rows where it saves at least this many token-rows of prefill
SHARED_PREFIX_MIN_SAVING = 64


def _shared_prefix(prompts: list[list[int]]) -> int:
    """The tokens every prompt opens with (each keeps at least one of its own), or 0 where sharing saves little."""
    from loraq.data.tokenize import common_prefix

    n = min(common_prefix(*prompts), min(len(p) for p in prompts) - 1)
    return n if n * (len(prompts) - 1) >= SHARED_PREFIX_MIN_SAVING else 0


class _ModelSteps:
    """transformers' forward with a static cache; rows that join rebuild it: every row's context (prompt and
    tokens so far) is prefilled again (correct for any family, only slower than a merge)."""

    def __init__(self, model: nn.Module):
        self.model, self.cache = model, None

    def join(self, batch: DecodeBatch, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        everyone = batch.rows + rows
        ids, mask = left_padded([r.prompt + r.result.tokens for r in everyone], batch.pad_id)
        self.cache = new_cache(self.model, len(everyone), ids.shape[1] + max(r.remaining for r in everyone))
        batch.route([r.route for r in everyone])
        device = batch.device
        logits = _forward(self.model, ids.to(device), mask.to(device), position_ids(mask).to(device), self.cache,
                          prefill=True)
        return logits, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return _forward(self.model, ids, mask, positions, self.cache)

    def keep(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)  # transformers' public row selection (beam search's)

    def reset(self) -> None:
        self.cache = None


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
def eval_mode(model: nn.Module):
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
