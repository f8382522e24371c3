"""One batch whose rows use different adapters (or none): the LoRA update gathered per row.

A model with adapters ``a_1 .. a_n`` loaded side by side (:func:`loraq.lora.files.load_adapter` under
different names) computes, for row ``i`` of a batch routed to adapters ``K_i`` (none, one, or a mix), each
``k`` in it with weight ``w_ik``::

    y_i = W0 x_i + b + sum_{k in K_i} w_ik * s_k * B_k A_k x_i

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

# a row's adapters and their weights: () = the base alone; (("a", 1.0),) = adapter a; a mix may name several
Route = tuple[tuple[str, float], ...]


def as_route(adapters: str | None | Sequence[tuple[str, float]]) -> Route:
    """A row's :data:`Route` from an adapter name (weight 1), None (the base alone) or ``(name, weight)`` pairs."""
    if adapters is None:
        return ()
    if isinstance(adapters, str):
        return ((adapters, 1.0),)
    return tuple((str(name), float(weight)) for name, weight in adapters)


class RowAdapters:
    """Routes row ``i`` of every forward in the block to ``routes[i]`` (see :func:`as_route`); :meth:`set`
    routes the next forwards' rows anew."""

    def __init__(self, model: nn.Module, routes: Sequence = ()):
        from loraq.lora.model import lora_layers, saved_modules

        if saved_modules(model):
            raise ConfigError("adapters that train whole modules (modules_to_save) cannot share a batch; "
                              "generate with one adapter at a time")
        self.model, self.active = model, False
        self.layers = [layer for _, layer in lora_layers(model)]
        self.set(routes)

    def refresh(self) -> None:
        """Take in layers added since (an adapter installed while the block is open)."""
        from loraq.lora.model import lora_layers

        self.layers = [layer for _, layer in lora_layers(self.model)]
        if self.active:
            self.__enter__()

    def known(self) -> set[str]:
        return set().union(*(layer.adapter_names for layer in self.layers)) if self.layers else set()

    def set(self, routes: Sequence) -> None:
        """Route the rows of the next forwards: ``routes[i]`` for row ``i`` (checked: loaded, not DoRA)."""
        routes = [as_route(r) for r in routes]
        names = {name for route in routes for name, _ in route}
        if names:
            known = self.known()
            for name in names:
                if name not in known:
                    raise ConfigError(f"adapter {name!r} is not loaded (loaded: {', '.join(sorted(known)) or 'none'})")
                if any(layer.is_dora(name) for layer in self.layers):
                    raise ConfigError(f"adapter {name!r} is a DoRA adapter: it cannot share a batch with other "
                                      "adapters; generate with it alone")
        self.routes = routes
        self.groups: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # adapter, its rows, their weights
        for name in sorted(names):
            picked = [(i, w) for i, route in enumerate(routes) for n, w in route if n == name]
            self.groups.append((name, torch.tensor([i for i, _ in picked], dtype=torch.long),
                                torch.tensor([w for _, w in picked], dtype=torch.float32)))

    def keep(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Only ``rows`` (indices into the current batch, in order) stay in the batch."""
        self.set([self.routes[i] for i in torch.as_tensor(rows, dtype=torch.long).tolist()])

    def __enter__(self) -> RowAdapters:
        for layer in self.layers:
            if layer.merged_adapters:
                raise ConfigError("per-row adapters need unmerged adapters; unmerge the model first")
            layer.row_adapters = self
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        for layer in self.layers:
            layer.row_adapters = None

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output for a batch ``x [rows, ..., in]`` routed row by row (see the module docstring)."""
        y = layer.base(x)
        if not self.groups:
            return y
        if x.shape[0] != len(self.routes):
            raise ValueError(f"a batch of {x.shape[0]} rows routed for {len(self.routes)}")
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
