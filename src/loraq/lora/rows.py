"""One batch whose rows use different adapters (or none): the LoRA update gathered per row.

A model with adapters ``a_1 .. a_n`` loaded side by side (:func:`loraq.lora.files.load_adapter` under
different names) computes, for row ``i`` of a batch routed to adapters ``K_i`` (none, one, or a mix), each
``k`` in it with weight ``w_ik``::

    y_i = W0 x_i + b + sum_{k in K_i} w_ik * s_k * B_k A_k x_i

The base product runs once for the whole batch. The low-rank updates take one of two forms:

* **stacked** (decoding, no autograd): every adapter installed has a slot of ``R`` columns (``R``: the largest
  rank), and each layer keeps ``A_stack = [A_1; ...; A_S]`` (``[S R, in]``, zero-padded) and ``B_stack = [s_1
  B_1, ..., s_S B_S]`` (``[out, S R]``). With ``C [rows, S R]`` holding ``w_ik`` over slot ``k``'s columns of
  row ``i`` (built once per routing), ``y = W0 x + b + ((x A_stack^T) * C) B_stack^T``: three operations per
  layer whatever the number of adapters and mixes (the per-adapter loop costs ~10 small operations per adapter
  and layer, which on a CPU is most of a mixed batch's step). Its cost: reading every installed adapter once
  per step (its bytes, not its rows).
* **segment** (the reference, and whenever autograd records): per adapter present, its rows gathered, ``B (A
  x)``, added back with ``index_add_`` -- the segment form of the Punica / vLLM gather + batched-matmul idea.

A test holds the two equal. The pair is the one the layer applies (:meth:`~loraq.lora.layer.LoraLinear.factors`:
with the calibrated init's frozen correction beside it). A row routed to no adapter gets the base alone,
``W0 x_i + b``.

DoRA adapters rescale the base's output by the adapted weight's column norms and so cannot share the base
product across rows with different adapters; they are refused here (one adapter at a time still works,
through the layer's own forward). Routing is set for the duration of a ``with RowAdapters(...)`` block;
:meth:`RowAdapters.set` routes the next forwards' rows; :meth:`RowAdapters.refresh` takes in adapters installed or
removed since (the stacks are rebuilt).
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
        from loraq.lora.model import saved_modules

        if saved_modules(model):
            raise ConfigError("adapters that train whole modules (modules_to_save) cannot share a batch; "
                              "generate with one adapter at a time")
        self.model, self.active = model, False
        self.routes: list[Route] = []
        self.layout_version = 0  # counts layouts: stacks made before another one are stale
        self._layout()
        self.set(routes)

    def _layout(self) -> None:
        """The layers, the adapters' slots (sorted names) and the slot width ``R``; stacks built lazily."""
        from loraq.lora.model import lora_layers

        self.layers = [layer for _, layer in lora_layers(self.model)]
        self.slots = sorted(self.known())
        self.width = max((layer.factors(n)[0].shape[0] for layer in self.layers for n in layer.adapter_names),
                         default=0)
        self._stacks: dict = {}
        self._coefs: dict = {}
        self.layout_version += 1

    def refresh(self) -> None:
        """Take in adapters (and layers) installed or removed since: new slots, stacks rebuilt when next used."""
        self._layout()
        self.set(self.routes)
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
        self._coefs = {}
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
        if torch.is_grad_enabled() or not self.stacked:
            return self.segments(layer, x, y)
        a, b = self.stack(layer, x.dtype)
        h = torch.nn.functional.linear(x, a).mul_(self.coefficients(x))
        return y.add_(torch.nn.functional.linear(h, b).to(y.dtype))

    stacked = True  # the stacked form where it applies (tests set False to run the reference)

    def segments(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reference: ``y`` plus each adapter's update on its own rows (gathered, added back)."""
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

    def stack(self, layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_stack [S R, in], B_stack [out, S R])`` of ``layer`` in ``dtype``, made once per layout."""
        key = (layer, dtype)
        if key not in self._stacks:
            r = self.width
            device = layer.base_device()
            a_stack = torch.zeros(len(self.slots) * r, layer.in_features, dtype=dtype, device=device)
            b_stack = torch.zeros(layer.out_features, len(self.slots) * r, dtype=dtype, device=device)
            for k, name in enumerate(self.slots):
                if name in layer.adapter_names:
                    a, b = layer.factors(name)
                    a_stack[k * r:k * r + a.shape[0]] = a.detach()
                    b_stack[:, k * r:k * r + a.shape[0]] = b.detach() * layer.scaling[name]
            self._stacks[key] = (a_stack, b_stack)
        return self._stacks[key]

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """``C [rows, 1, ..., S R]`` for ``x``: row ``i``'s weight for adapter ``k`` over slot ``k``'s columns."""
        key = (x.dtype, x.ndim, x.device)
        if key not in self._coefs:
            r, index = self.width, {name: k for k, name in enumerate(self.slots)}
            coef = torch.zeros(len(self.routes), len(self.slots) * r)
            for i, route in enumerate(self.routes):
                for name, weight in route:
                    coef[i, index[name] * r:(index[name] + 1) * r] += weight
            self._coefs[key] = coef.to(dtype=x.dtype, device=x.device).view(len(self.routes), *([1] * (x.ndim - 2)),
                                                                            -1)
        return self._coefs[key]
