"""Second moments of linear layers' inputs on calibration data, one decoder block at a time.

The calibrated initialisation (:func:`loraq.lora.init.calibrated`) needs, for
every targeted layer, ``H = sum_x x x^T`` over the calibration tokens, ``x``
the layer's input in the full-precision model. Collecting every layer's at
once would keep a float64 ``[in, in]`` matrix per layer of the whole model;
instead :func:`block_second_moments` walks the decoder blocks:

1. the calibration rows, right-padded into batches (attention is causal, so a
   real token never sees the padding to its right, and padded positions are
   left out of the sums), run through the model up to the first decoder
   block, whose inputs (hidden states and keyword arguments such as the
   position embeddings) are kept: ``N x T x hidden`` values in all;
2. for each block in turn, forward hooks on its targeted layers add ``x^T x``
   over the real tokens (a float32 product per batch, float64 sums; layers
   reading the same tensor, such as q/k/v, share one product), the block's
   outputs replace its inputs, and the block's moments are handed to the
   caller, who may now change the block's layers: the next block's inputs
   were computed with the weights as they were, so every moment is the
   full-precision model's.

At any time one block's moments and one set of hidden states are alive.
Runs on whatever device holds the model, in the model's dtype, in eval mode
and without gradients.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from loraq.errors import ConfigError

TOKENS_PER_BATCH = 4096


@dataclass
class _BlockInput:
    """One batch at the input of the current block."""

    hidden: torch.Tensor  # [batch, T, hidden]
    kwargs: dict[str, Any]  # what the model passes the block besides the hidden states
    valid: torch.Tensor  # [batch, T] bool: a real token, not padding


class _Captured(Exception):
    """Raised by the hook on the first block: the rest of the model is not needed."""


def decoder_blocks(model: nn.Module, layer_names: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the ``nn.ModuleList`` of decoder blocks that holds every one of ``layer_names``.

    A ConfigError names a layer outside it (the walk only sees inside blocks).
    """
    best: tuple[int, str, nn.ModuleList | None] = (0, "", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            inside = sum(any(n.startswith(f"{name}.{i}.") for i in range(len(module))) for n in layer_names)
            best = max(best, (inside, name, module), key=lambda t: t[0])
    count, list_name, blocks = best
    if blocks is None or count < len(layer_names):
        outside = ([n for n in layer_names if not n.startswith(f"{list_name}.")] if blocks is not None
                   else list(layer_names))
        raise ConfigError("--init calibrated fits layers inside the model's decoder blocks; "
                          f"{outside[0]} is not in one: "
                          "leave it out with --exclude-modules or use --init loftq")
    return list_name, blocks


def padded_batches(token_rows: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                   tokens_per_batch: int = TOKENS_PER_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids [b, T], valid [b, T])`` batches of rows of similar length, right-padded, about
    ``tokens_per_batch`` tokens (padding included) each."""
    rows = sorted((list(r) for r in token_rows if len(r)), key=len)
    batches, start = [], 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and (end + 1 - start) * len(rows[end]) <= tokens_per_batch:
            end += 1
        group, width = rows[start:end], len(rows[end - 1])
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(group), width), dtype=torch.bool)
        for i, row in enumerate(group):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            valid[i, :len(row)] = True
        batches.append((ids.to(device), valid.to(device)))
        start = end
    return batches


def _first_block_inputs(model: nn.Module, first_block: nn.Module,
                        batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[_BlockInput]:
    caught: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        caught.append((args, dict(kwargs)))
        raise _Captured

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    inputs = []
    try:
        for ids, valid in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
            args, kwargs = caught.pop()
            hidden = args[0] if args else kwargs.pop("hidden_states")
            inputs.append(_BlockInput(hidden, kwargs, valid))
    finally:
        handle.remove()
    return inputs


class _MomentSums:
    """Forward pre-hooks adding ``x^T x`` over the valid tokens into one float64 sum per layer."""

    def __init__(self, block: nn.Module, names: dict[str, str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, str]] = []  # this batch's inputs, and the first layer that read each
        self._aliases: dict[str, str] = {}
        self._handles = [block.get_submodule(local).register_forward_pre_hook(self._hook(full))
                         for full, local in names.items()]

    def start_batch(self, valid: torch.Tensor) -> None:
        self.valid, self._seen = valid, []

    def _hook(self, name: str):
        def add(module, args):
            x = args[0]
            # the very tensor another layer read (q/k/v, gate/up): the same moment (identity, not address:
            # a freed tensor's memory may be reused)
            first = next((other for seen, other in self._seen if seen is x), None)
            if first is not None:
                self._aliases[name] = first
                return
            self._seen.append((x, name))
            rows = x.detach().reshape(-1, x.shape[-1])[self.valid.reshape(-1)].float()
            product = (rows.T @ rows).double()
            self.sums[name] = product if name not in self.sums else self.sums[name].add_(product)
        return add

    def finish(self) -> dict[str, torch.Tensor]:
        for handle in self._handles:
            handle.remove()
        return {**self.sums, **{n: self.sums[src] for n, src in self._aliases.items()}}


@torch.no_grad()
def block_second_moments(model: nn.Module, layer_names: Sequence[str], token_rows: Sequence[Sequence[int]],
                         pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Per decoder block, in order: ``{layer name: H}`` (float64 ``[in, in]``) for the layers of ``layer_names``
    inside it, ``H = sum x x^T`` over every real token of ``token_rows`` (module docstring).

    The caller may change a block's layers between receiving its moments and
    asking for the next block's.
    """
    if not token_rows or not any(len(r) for r in token_rows):
        raise ConfigError("--init calibrated needs calibration rows (--calibration-data, or training data)")
    list_name, blocks = decoder_blocks(model, layer_names)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        inputs = _first_block_inputs(model, blocks[0], padded_batches(token_rows, pad_id, device))
        for index, block in enumerate(blocks):
            prefix = f"{list_name}.{index}."
            names = {n: n[len(prefix):] for n in layer_names if n.startswith(prefix)}
            sums = _MomentSums(block, names)
            try:
                for item in inputs:
                    sums.start_batch(item.valid)
                    out = block(item.hidden, **item.kwargs)
                    item.hidden = out[0] if isinstance(out, tuple) else out
            finally:
                moments = sums.finish()
            if names:
                yield moments
    finally:
        model.train(was_training)
