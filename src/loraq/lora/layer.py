"""The LoRA layer, and the wrapper for modules trained in full.

``LoraLinear`` wraps a frozen linear layer ``W0`` (``nn.Linear``, transformers'
``Conv1D`` -- whose weight is stored transposed, PEFT's ``fan_in_fan_out`` --
or loraq's 4-bit ``Linear4bit``) and adds, for each active adapter ``a``::

    x -> W0 x + b + s_a * B_a A_a dropout_a(x)      s_a = alpha_a / r_a   (alpha_a / sqrt(r_a) with rsLoRA)

``A_a`` is ``[r, in_features]`` and ``B_a`` is ``[out_features, r]`` whatever
the base's storage layout (``B A`` is always ``[out, in]``, as in PEFT); they
are the ``weight`` of the ``lora_A[a]`` / ``lora_B[a]`` sub-layers, kept in
float32 (master weights) whatever the base's dtype. The low-rank path runs in
the input's dtype: A and B are cast once per forward (a no-op in fp32), so
the gradients reach the fp32 masters through the cast. Dropout exists only
when p > 0; with p == 0 the input goes straight to A.

A DoRA adapter (:mod:`loraq.lora.dora`) also has a magnitude ``m_a`` [out]
(``lora_magnitude_vector[a]``, float32) and computes
``(m_a / ||W0 + s_a B_a A_a||) * (W0 + s_a B_a A_a) x + b``.

Merging folds ``sum_a s_a B_a A_a`` (DoRA: the rescaled weight) into the base
weight (computed in float32, then rounded to the weight's dtype), in the
base's own layout. A 4-bit base is never merged in place: it is dequantized
into a plain ``nn.Linear`` (a ``Conv1D`` if it was quantized from one) of the
chosen dtype and the 4-bit layer is kept aside so ``unmerge`` restores it
exactly; so is any base under a DoRA adapter.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from loraq.lora import dora
from loraq.lora.config import scaling as lora_scaling
from loraq.lora.node import lora_linear
from loraq.modules import dense_layer, is_conv1d, linear_features, linear_weight


def is_4bit(module: nn.Module) -> bool:
    """A loraq Linear4bit (checked without importing the 4-bit engine)."""
    return hasattr(module, "quant_state") and hasattr(module, "dequantize")


def conv1d_layout(module: nn.Module) -> bool:
    """The model's layer here is a Conv1D: it is one, or a 4-bit layer quantized from one."""
    return is_conv1d(module) or bool(getattr(module, "conv1d", False))


class LoraLinear(nn.Module):
    """``x -> base(x) + sum over active adapters of s * B(A(dropout(x)))``; base frozen, A/B trainable fp32."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = linear_features(base)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()  # only adapters with p > 0 have an entry
        self.lora_magnitude_vector = nn.ParameterDict()  # only DoRA adapters have an entry
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # (A0, B0) of adapters whose initialisation changed the base (pissa, loftq): the file
        # format stores updates relative to the untouched base, see files.py
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # adapter -> frozen (A0, B0) beside its trainable pair, applied with its scale: the calibrated init's
        # correction of the 4-bit base (init.calibrated); the layer then computes base + s [B, B0] [A; A0]
        self.lora_correction = nn.ModuleDict()
        self._base_before_merge: nn.Module | None = None
        self._merge_dtype: torch.dtype | None = None
        self.row_adapters = None  # a loraq.lora.rows.RowAdapters while a batch routes its rows to adapters
        self._inference_factors: dict = {}  # adapter -> (key, A, (s B)^T) for products without autograd

    # -- adapters -------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0,
                    use_dora: bool = False) -> None:
        """A new adapter with zero A and B (an initialiser in init.py fills them; a DoRA magnitude is set by
        :meth:`init_magnitude` once they are, or loaded)."""
        device = self.base_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.lora_A[name].weight.zero_()
            self.lora_B[name].weight.zero_()
        if dropout > 0:
            self.lora_dropout[name] = nn.Dropout(p=dropout)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(
                torch.ones(self.out_features, device=device, dtype=torch.float32))
        self.r[name] = r
        self.lora_alpha[name] = float(alpha)
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector, self.lora_correction):
            if name in table:
                del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.initial_factors, self._inference_factors):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_correction(self, name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Freeze ``(A0 [r0, in], B0 [out, r0])`` beside adapter ``name``'s pair (see ``lora_correction``)."""
        if a0.ndim != 2 or a0.shape[1] != self.in_features or tuple(b0.shape) != (self.out_features, a0.shape[0]):
            raise ValueError(f"a correction of shapes {tuple(a0.shape)}, {tuple(b0.shape)} does not fit a "
                             f"[{self.out_features}, {self.in_features}] layer")
        # in the dtype the layer computes in: the forward rounds the pair to it anyway (half the bytes in bf16)
        dtype = self.base.compute_dtype if is_4bit(self.base) else torch.float32
        self.lora_correction[name] = Correction(a0.to(dtype), b0.to(dtype))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of adapter ``name`` as the layer applies them: ``([A; A0], [B, B0])`` with a correction."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if name not in self.lora_correction:
            return a, b
        c = self.lora_correction[name]
        return torch.cat([a, c.a.to(a.dtype)]), torch.cat([b, c.b.to(b.dtype)], dim=1)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    @property
    def conv1d(self) -> bool:
        """The model's layer is a Conv1D (PEFT's ``fan_in_fan_out``): merges go back to that layout."""
        return conv1d_layout(self.base if self._base_before_merge is None else self._base_before_merge)

    def init_magnitude(self, name: str) -> None:
        """DoRA's start: ``m = ||W0 + s B A||`` per output, so the adapted weight is ``W0 + s B A``."""
        with torch.no_grad():
            self.lora_magnitude_vector[name].copy_(self.weight_norm(name))

    def weight_norm(self, name: str) -> torch.Tensor:
        """``||W0 + s B A||`` per output row, float32, no gradient (:func:`loraq.lora.dora.weight_norm`)."""
        return dora.weight_norm(self.base, *self.factors(name), self.scaling[name])

    @property
    def weight(self) -> torch.Tensor:
        # code that reads `layer.weight` (dtype/device probes) sees the base weight
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def base_device(self) -> torch.device:
        return self.base.weight.device

    # -- forward --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:
            return self.row_adapters.forward(self, x)
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        y = base_y = self.base(x)
        if self.disabled:
            return y
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                y = self._add_dora_update(y, x, name, base_y) if self.is_dora(name) else self._add_update(y, x, name)
        return y

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The usual training case as one autograd node (:mod:`loraq.lora.node`), or None for the generic path.

        It applies to one active, unmerged, non-DoRA adapter without dropout over a loraq 4-bit base or a
        plain ``nn.Linear`` / ``Conv1D`` in the input's dtype; everything else (several adapters, dropout,
        DoRA, merged, other base types) takes the generic path below, which is the reference the fused node
        is tested against.
        """
        if self.disabled or self.merged_adapters or len(self.active_adapters) != 1:
            return None
        if not torch.is_grad_enabled():
            return None  # nothing to differentiate: the generic path (the base's own inference product) is cheaper
        name = self.active_adapters[0]
        if name in self.lora_dropout or self.is_dora(name):
            return None
        base = self.base
        (a, b), s = self.factors(name), self.scaling[name]
        if is_4bit(base):
            y = lora_linear(x.to(base.compute_dtype), base.weight, base.quant_state, base.bias, a, b, s)
            return y.to(x.dtype)
        if (type(base) is nn.Linear or is_conv1d(base)) and base.weight.dtype == x.dtype:
            # a Conv1D's [in, out] weight enters as its transposed view: x W0^T = x @ weight, no copy
            return lora_linear(x, linear_weight(base), None, base.bias, a, b, s)
        return None

    def _add_update(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if not torch.is_grad_enabled() and y.dtype == x.dtype and (not self.training or name not in self.lora_dropout):
            return self._add_update_inference(y, x, name)
        a, b = self.factors(name)
        if name in self.lora_dropout:
            x = self.lora_dropout[name](x)
        if a.dtype != x.dtype:
            a = a.to(x.dtype)
            b = b.to(x.dtype)
        h = F.linear(x, a)  # [..., r]: the cheap half
        if y.dtype != h.dtype:  # a base that computes in another dtype than its input
            return y + F.linear(h, b).to(y.dtype) * self.scaling[name]
        # y + s * h @ B^T as one fused GEMM (no separate scale and add passes over [tokens, out])
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling[name])
        return out.view(y.shape)

    def _add_update_inference(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``y + (x A^T) (s B)^T`` into the base's fresh output ``y`` (nothing records it), with ``A`` and ``(s
        B)^T`` kept in ``x``'s dtype, contiguous (a transposed view makes this product ~2.5x slower on a CPU),
        remade when the factors change (their storage or version: an optimizer step between evaluations)."""
        a, sbt = self.inference_factors(name, x.dtype)
        h = F.linear(x, a).reshape(-1, a.shape[0])
        if not y.is_contiguous():
            return y + (h @ sbt).view(y.shape)
        y.view(-1, self.out_features).addmm_(h, sbt)
        return y

    def inference_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], (s B)^T [r, out])`` of adapter ``name`` in ``dtype``, contiguous, detached; kept until the
        factors change (storage, version, scale or correction) or another dtype is asked for."""
        wa, wb = self.lora_A[name].weight, self.lora_B[name].weight
        key = (dtype, wa.data_ptr(), wa._version, wb.data_ptr(), wb._version, self.scaling[name],
               id(self.lora_correction[name]) if name in self.lora_correction else None)
        kept = self._inference_factors.get(name)
        if kept is None or kept[0] != key:
            a, b = self.factors(name)
            kept = (key, a.detach().to(dtype).contiguous(),
                    (b.detach().float() * self.scaling[name]).t().contiguous().to(dtype))
            self._inference_factors[name] = kept
        return kept[1], kept[2]

    def _add_dora_update(self, y: torch.Tensor, x: torch.Tensor, name: str, base_y: torch.Tensor) -> torch.Tensor:
        """``y + (c - 1) * W0 x' + c * s B A x'`` with ``c = m / ||W0 + s B A||`` (constant in backward) and
        ``x'`` the adapter's (dropped-out) input; without dropout ``W0 x`` is the base's output ``base_y``
        less the bias (never another adapter's update: the sum is the one ``merged_weight`` forms)."""
        a, b = self.factors(name)
        c = (self.lora_magnitude_vector[name] / self.weight_norm(name)).to(y.dtype)
        if name in self.lora_dropout:
            x = self.lora_dropout[name](x)
            w0x = F.linear(x, self._dense_weight(x.dtype)).to(y.dtype)
        else:
            w0x = base_y if self.base.bias is None else base_y - self.base.bias.to(base_y.dtype)
        low_rank = F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)).to(y.dtype)
        return y + (c - 1) * w0x + c * self.scaling[name] * low_rank

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``W0`` as ``[out, in]`` in ``dtype``, for a product (dequantized for a 4-bit base)."""
        if is_4bit(self.base):
            return self.base.dequantize(dtype)
        return linear_weight(self.base).to(dtype)

    # -- merge ----------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` in float32, ``[out_features, in_features]`` (with its correction: ``s [B, B0] [A; A0]``)."""
        a, b = self.factors(name)
        return (b.detach().float() @ a.detach().float()) * self.scaling[name]

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight ``W0`` as a dense tensor (dequantized for a 4-bit base)."""
        if is_4bit(self.base):
            return self.base.dequantize(dtype)
        return linear_weight(self.base).detach().to(dtype)

    def merged_weight(self, dtype: torch.dtype | None = None, names: list[str] | None = None) -> torch.Tensor:
        """``W0 + sum s_a B_a A_a`` over ``names`` (default: the active adapters), computed in float32, ``[out, in]``.

        A DoRA adapter contributes ``(c - 1) W0 + c s B A`` (``c = m / ||W0 + s B A||``), as in its forward:
        alone on a layer, ``c (W0 + s B A)``, PEFT's merge.
        """
        names = self._unmerged_active() if names is None else names
        w0 = self.base_weight(torch.float32)
        w = w0.clone()
        for name in names:
            if self.is_dora(name):
                c = (self.lora_magnitude_vector[name].detach().float() / self.weight_norm(name))[:, None]
                w += (c - 1) * w0 + c * self.delta_weight(name)
            else:
                w += self.delta_weight(name)
        return w if dtype is None else w.to(dtype)

    def merge(self, dtype: torch.dtype | None = None) -> list[str]:
        """Fold the active adapters into the base weight; returns the adapters merged.

        An ``nn.Linear`` base keeps its dtype unless ``dtype`` is given. A 4-bit
        base becomes an ``nn.Linear`` in ``dtype`` (default: its compute dtype);
        it is never re-quantized here.
        """
        names = self._unmerged_active()
        if not names:
            return []
        self._merge_dtype = dtype
        dora_merge = any(self.is_dora(n) for n in names)  # not undone by a subtraction: the base is kept aside
        if is_4bit(self.base) or dora_merge or (dtype is not None and dtype != self.base.weight.dtype):
            target = dtype or getattr(self.base, "compute_dtype", None) or self.base.weight.dtype
            conv1d = self.conv1d
            if self._base_before_merge is None:
                self._base_before_merge = self.base
            self.base = dense_layer(self.merged_weight(target, names), self.base.bias, target, conv1d)
        else:
            w = linear_weight(self.base)
            with torch.no_grad():
                w.copy_(self.merged_weight(torch.float32, names).to(w.dtype))
        self.merged_adapters.extend(names)
        return names

    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact for a 4-bit or re-typed base; for an in-place merge, up to the weight's
        rounding)."""
        if not self.merged_adapters:
            return
        if self._base_before_merge is not None:
            self.base = self._base_before_merge
            self._base_before_merge = None
        else:
            w = linear_weight(self.base)
            delta = sum(self.delta_weight(name) for name in self.merged_adapters)
            with torch.no_grad():
                w.copy_((w.float() - delta).to(w.dtype))
        self.merged_adapters = []

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]} s={self.scaling[n]:g}{' dora' if self.is_dora(n) else ''}"
                          for n in self.adapter_names)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}], "
                f"active={self.active_adapters}")


class Correction(nn.Module):
    """A frozen low-rank pair: buffers ``a`` [r0, in] and ``b`` [out, r0] in the dtype given, moved with the model
    and kept out of its state dict (an adapter folder stores them apart, :mod:`loraq.lora.files`)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a.detach().clone(), persistent=False)
        self.register_buffer("b", b.detach().clone(), persistent=False)


class ModulesToSave(nn.Module):
    """``modules_to_save``: a module trained in full per adapter, the original kept for disabling.

    ``x -> copy_a(x)`` for the active adapter ``a``; ``x -> original(x)`` when
    disabled or when no adapter is active.
    """

    _OWN = ("original_module", "modules_to_save", "active_adapter", "disabled")

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        trained = copy.deepcopy(self.original_module)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = trained

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self._OWN:
                raise
            # attribute probes (`head.weight`, `head.out_features`) see the module in use
            return getattr(self.active_module(), name)
