"""One batch whose rows use different adapters (or none): the LoRA update gathered per row.

A model with adapters ``a_1 .. a_n`` loaded side by side (:func:`loraq.lora.files.load_adapter` under
different names) computes, for row ``i`` of a batch routed to adapter ``k_i`` (or to none) with weight ``w_i``::

    y_i = W0 x_i + b + w_i * s_k * B_k A_k x_i

The base product runs once for the whole batch; the low-rank update runs once per adapter present in the
batch, on that adapter's rows only (gathered, then added back with ``index_add_``) -- the segment form of
the Punica / vLLM gather + batched-matmul idea, which never copies an adapter's ``A`` / ``B`` per row. The
pair is the one the layer applies (:meth:`~loraq.lora.layer.LoraLinear.factors`: with the calibrated init's
frozen correction beside it). A row routed to no adapter gets the base alone, ``W0 x_i + b``.

DoRA adapters rescale the base's output by the adapted weight's column norms and so cannot share the base
product across rows with different adapters; they are refused here (one adapter at a time still works,
through the layer's own forward). Routing is set for the duration of a ``with RowAdapters(...)`` block;
:meth:`RowAdapters.keep` follows rows leaving the batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loraq.errors import ConfigError


class RowAdapters:
    """Routes row ``i`` of every forward in the block to ``names[i]`` (None: no adapter), weighted ``scales[i]``."""

    def __init__(self, model: nn.Module, names: Sequence[str | None], scales: Sequence[float] | None = None):
        from loraq.lora.model import lora_layers, saved_modules

        if saved_modules(model):
            raise ConfigError("adapters that train whole modules (modules_to_save) cannot share a batch; "
                              "generate with one adapter at a time")
        self.layers = [layer for _, layer in lora_layers(model)]
        known = set().union(*(layer.adapter_names for layer in self.layers)) if self.layers else set()
        for name in {n for n in names if n is not None}:
            if name not in known:
                raise ConfigError(f"adapter {name!r} is not loaded (loaded: {', '.join(sorted(known)) or 'none'})")
            if any(layer.is_dora(name) for layer in self.layers):
                raise ConfigError(f"adapter {name!r} is a DoRA adapter: it cannot share a batch with other "
                                  "adapters; generate with it alone")
        self.names = list(names)
        self.scales = torch.tensor([1.0] * len(self.names) if scales is None else list(scales), dtype=torch.float32)
        self._group()

    def _group(self) -> None:
        """Per adapter present: the row indices routed to it, and their weights as a column."""
        self.groups: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for name in dict.fromkeys(n for n in self.names if n is not None):
            rows = torch.tensor([i for i, n in enumerate(self.names) if n == name], dtype=torch.long)
            self.groups.append((name, rows, self.scales[rows]))

    def keep(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Only ``rows`` (indices into the current batch, in order) stay in the batch."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        self.names = [self.names[i] for i in rows.tolist()]
        self.scales = self.scales[rows]
        self._group()

    def __enter__(self) -> RowAdapters:
        for layer in self.layers:
            if layer.merged_adapters:
                raise ConfigError("per-row adapters need unmerged adapters; unmerge the model first")
            layer.row_adapters = self
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.row_adapters = None

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output for a batch ``x [rows, ..., in]`` routed row by row (see the module docstring)."""
        y = layer.base(x)
        if not self.groups:
            return y
        if x.shape[0] != len(self.names):
            raise ValueError(f"a batch of {x.shape[0]} rows routed for {len(self.names)}")
        in_place = not torch.is_grad_enabled()  # the base's fresh output, nothing records it: add into it
        for name, rows, weights in self.groups:
            if name not in layer.adapter_names:
                continue
            a, b = layer.factors(name)
            xs = x.index_select(0, rows)
            h = torch.nn.functional.linear(xs, a.to(xs.dtype))
            scale = (weights * layer.scaling[name]).to(h.dtype).view(-1, *([1] * (h.ndim - 1)))
            update = torch.nn.functional.linear(h * scale, b.to(xs.dtype)).to(y.dtype)
            y = y.index_add_(0, rows, update) if in_place else y.index_add(0, rows, update)
        return y
