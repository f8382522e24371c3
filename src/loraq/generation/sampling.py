"""Decoding options and the next-token rule.

For one row with logits ``z`` (float32) and options ``(temperature T, top_k k, top_p p)``:

* ``T == 0``: greedy, ``argmax z`` (the first index on ties, as ``torch.argmax``).
* ``T > 0``: ``z / T``; then only the ``k`` largest kept (``k == 0``: all; ties at the k-th value kept);
  then only the smallest set of the largest whose probability ``softmax`` reaches ``p`` (at least one);
  the rest set to ``-inf``; one draw from ``softmax`` of what is left with ``torch.multinomial`` on the
  row's own generator, seeded with its ``seed`` (or from the global generator when it has none).

This is transformers' order (temperature, top-k, top-p) and its rules, so a row seeded ``s`` draws what
``torch.manual_seed(s); model.generate(do_sample=True, ...)`` draws for a batch of one (a test holds them
equal); each row has its own generator, so a row's draws do not depend on the rows beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraq.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How one row decodes: up to ``max_new_tokens``; greedy at ``temperature == 0``; ``stop``: strings that end
    it (removed from its text)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_options(self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_options(max_new_tokens: int, temperature: float, top_p: float, top_k: int = 0) -> None:
    """A ConfigError naming the flag when a decoding option is out of range."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (got {top_p})")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (got {top_k}); 0 keeps every token")


def generator_for(options: Sampling) -> torch.Generator | None:
    """The row's own generator: seeded when it has a seed, else None (the global one)."""
    if options.greedy or options.seed is None:
        return None
    return torch.Generator().manual_seed(options.seed)


def filtered_logits(z: torch.Tensor, options: Sampling) -> torch.Tensor:
    """``z [V]`` scaled by the temperature with what top-k and top-p remove set to ``-inf`` (module docstring)."""
    z = z.float() / options.temperature
    if 0 < options.top_k < z.shape[-1]:
        kth = torch.topk(z, options.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if options.top_p < 1:
        ascending, order = torch.sort(z)
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - options.top_p
        drop[-1] = False  # the most likely token always stays
        z = z.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return z


def next_tokens(logits: torch.Tensor, options: list[Sampling],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token id of every row: ``logits [rows, V]``, one options and generator per row."""
    chosen = logits.argmax(-1)
    for i, (o, g) in enumerate(zip(options, generators)):
        if o.greedy:
            continue
        probs = filtered_logits(logits[i], o).softmax(-1)
        chosen[i] = torch.multinomial(probs[None], 1, generator=g)[0, 0]
    return chosen
