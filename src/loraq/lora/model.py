"""LoRA on a whole model: inject, count, switch, disable, combine, merge.

Every function takes the model itself (a transformers model or any
``nn.Module``); the LoRA layers live inside it (:class:`~loraq.lora.layer.LoraLinear`
in place of each targeted linear layer, :class:`~loraq.lora.layer.ModulesToSave`
around each module trained in full) and the adapters' configs are kept on the
model under ``_loraq_adapters`` (name -> :class:`~loraq.lora.config.LoraConfig`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from loraq.errors import ConfigError
from loraq.lora import init as lora_init
from loraq.lora.config import LoraConfig
from loraq.lora.layer import LoraLinear, ModulesToSave, conv1d_layout, is_4bit
from loraq.lora.record import FUNCTION_CHANGING_INITS
from loraq.lora.targeting import find_targets, iter_modules, resolve_modules_to_save
from loraq.modules import dense_layer, is_conv1d

CONFIGS_ATTR = "_loraq_adapters"
QUANTIZING_INITS = ("loftq", "calibrated")  # inits that quantize the base themselves
PEFT_PREFIX = "base_model.model."
MAGNITUDE_KEY = "lora_magnitude_vector"  # a DoRA magnitude in PEFT's files: <prefix><module>.lora_magnitude_vector


# -- where things are ----------------------------------------------------------
def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters on ``model``: name -> config (empty when none)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in iter_modules(model) if isinstance(m, LoraLinear)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(n, m) for n, m in iter_modules(model) if isinstance(m, ModulesToSave)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# -- inject ----------------------------------------------------------------------
def inject_lora(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    *,
    quant: dict | None = None,
    initialise: bool = True,
    generator: torch.Generator | None = None,
    calibration: Sequence[Sequence[int]] | None = None,
) -> list[str]:
    """Add adapter ``adapter_name`` to every layer ``config`` targets; returns their names.

    Every parameter of the model is frozen except the active adapter's A/B
    (and its ``modules_to_save`` copies). The first adapter on a model becomes
    active; later ones are added inactive (switch with :func:`set_adapter`).

    ``config.init == "loftq"`` needs the full-precision model and ``quant``
    (the keyword arguments of ``Linear4bit.from_linear``: ``quant_type``,
    ``double_quant``, ``blocksize``, ``compute_dtype``): each targeted
    ``nn.Linear`` becomes ``LoraLinear(Linear4bit(Q))`` with LoftQ's Q, A, B.
    ``config.init == "calibrated"`` needs the same, and ``calibration``: token-id
    rows run through the model to measure each layer's inputs (calibrate.py).
    ``initialise=False`` leaves A and B zero (for loading saved weights).
    """
    config.validate()
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ConfigError(f"the model already has an adapter named {adapter_name!r}; pick another name")
    targets = find_targets(model, config)
    save_names = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    if initialise and config.init in QUANTIZING_INITS:
        _check_quantizing_init(model, config.init, targets, quant)
    layers: dict[str, LoraLinear] = {}
    for name in targets:
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoraLinear) else LoraLinear(module)
        if layer is not module:
            set_submodule(model, name, layer)
        layer.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.use_rslora,
                          config.dropout, use_dora=config.use_dora)
        layers[name] = layer
    if initialise:
        for name, second_moment in _input_moments(model, config, targets, calibration):
            _initialise(layers[name], adapter_name, config, quant, generator, second_moment)
            if config.use_dora:
                layers[name].init_magnitude(adapter_name)
    for name in save_names:
        module = model.get_submodule(name)
        if is_4bit(module):
            raise ConfigError(f"modules_to_save {name!r} is a 4-bit layer and cannot be trained in full; leave it out")
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        if wrapper is not module:
            set_submodule(model, name, wrapper)
        wrapper.add_adapter(adapter_name)
    configs[adapter_name] = config
    active = active_adapters(model)
    set_adapter(model, active or [adapter_name])
    return targets


def _check_quantizing_init(model: nn.Module, init: str, targets: list[str], quant: dict | None) -> None:
    if quant is None:
        raise ConfigError(f"--init {init} fits the adapter to a 4-bit base: "
                          "use it with --method qlora (quantization settings missing)")
    for name in targets:
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLinear) else module
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise ConfigError(f"--init {init} needs the full-precision weight of {name}, which is already quantized; "
                              "apply LoRA before quantizing (load the model in full precision)")


def _input_moments(model: nn.Module, config: LoraConfig, targets: list[str],
                   calibration: Sequence[Sequence[int]] | None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(layer name, H)`` in the order the layers are initialised: the targets in order, with ``H = None``,
    except for ``calibrated``: block by block, each layer's input second moment (calibrate.py)."""
    if config.init != "calibrated":
        yield from ((name, None) for name in targets)
        return
    from loraq.lora.calibrate import block_second_moments

    if not calibration:
        raise ConfigError("--init calibrated needs calibration rows (--calibration-data, or the training data)")
    for moments in block_second_moments(model, targets, calibration):
        yield from moments.items()


def _initialise(layer: LoraLinear, name: str, config: LoraConfig, quant: dict | None,
                generator: torch.Generator | None, second_moment: torch.Tensor | None = None) -> None:
    r, s = layer.r[name], layer.scaling[name]
    if config.init in ("default", "gaussian"):
        make_a = lora_init.kaiming_uniform_a if config.init == "default" else lora_init.gaussian_a
        a, b = make_a(r, layer.in_features, generator), None
    elif config.init == "pissa":
        a, b, residual = lora_init.pissa(layer.base_weight(torch.float32), r, s)
        layer.base = rebuilt_base(layer.base, residual)
    else:  # loftq, calibrated: the base becomes the 4-bit Q they fitted A and B to
        quantize = _quantizer(quant)
        weight = layer.base_weight(torch.float32)
        if config.init == "loftq":
            a, b, (packed, state) = lora_init.loftq(weight, r, s, config.loftq_iters, quantize)
        else:
            # one fit, no re-quantization: the base stays q(W), the plain 4-bit model (bench/NOTES.md: the
            # alternation did not pay). The fit stays frozen beside the adapter, which starts as the default
            # init does: training moves only the new pair (bench/NOTES.md: trained, the fit lost its start)
            a0, b0, (packed, state) = lora_init.calibrated(weight, second_moment, config.fit_rank(r), s, 1, quantize)
            layer.set_correction(name, a0, b0)
            a, b = lora_init.kaiming_uniform_a(r, layer.in_features, generator), None
        layer.base = _quantized_base(layer.base, packed, state, quant)
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(a)
        if b is not None:
            layer.lora_B[name].weight.copy_(b)
    if config.init in FUNCTION_CHANGING_INITS:  # the file appends these initial factors (files.py)
        layer.initial_factors[name] = (a.detach().clone(), b.detach().clone())


def _quantizer(quant: dict):
    """``w -> ((packed, state), dequantized float32)`` with the run's 4-bit settings."""
    from loraq.quant.functional import dequantize_4bit, quantize_4bit

    settings = {k: quant[k] for k in ("quant_type", "double_quant", "blocksize") if k in quant}

    def quantize(w: torch.Tensor):
        packed, state = quantize_4bit(w, **settings)
        return (packed, state), dequantize_4bit(packed, state, dtype=torch.float32)

    return quantize


def _quantized_base(base: nn.Linear, packed: torch.Tensor, state, quant: dict) -> nn.Module:
    from loraq.quant.linear import Linear4bit

    state = dataclasses.replace(state, dtype=base.weight.dtype)  # the dtype of the weight it stands for
    bias = None if base.bias is None else base.bias.detach().clone()
    return Linear4bit(packed, state, bias, quant.get("compute_dtype", torch.bfloat16), conv1d=is_conv1d(base))


def quant_settings(linear4bit: nn.Module) -> dict:
    """``Linear4bit.from_linear`` keyword arguments that reproduce this layer's quantization."""
    state = linear4bit.quant_state
    return {"quant_type": state.quant_type, "double_quant": state.double_quant, "blocksize": state.blocksize,
            "compute_dtype": linear4bit.compute_dtype}


def rebuilt_base(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A frozen copy of ``base`` holding ``weight`` (re-quantized with the same settings for a 4-bit base).

    A new Parameter rather than an in-place write, so a weight tied to another
    module (an output head tied to the embeddings) is not changed through the tie.
    """
    if is_4bit(base):
        from loraq.quant.linear import Linear4bit

        new = Linear4bit.from_linear(dense_layer(weight, base.bias, torch.float32), **quant_settings(base))
        new.conv1d = base.conv1d
        return new.requires_grad_(False)
    stored = weight.t().contiguous() if is_conv1d(base) else weight  # ``weight`` is [out, in]
    base.weight = nn.Parameter(stored.to(base.weight.dtype), requires_grad=False)
    return base


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """After LoftQ (which loads in float32): the remaining frozen weights (embeddings, norms, head) to ``dtype``."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype and "inv_freq" not in name:
            buf.data = buf.data.to(dtype)


# -- parameters --------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters; a 4-bit weight counts as its ``out * in`` values, a tied weight once."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = module.in_features * module.out_features if (pname == "weight" and is_4bit(module)) else p.numel()
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line: ``trainable params: N (x.xx%) of M``."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} ({100.0 * trainable / max(total, 1):.2f}%) of {total:,}"


# -- switching and disabling -----------------------------------------------------------
def active_adapters(model: nn.Module) -> list[str]:
    for _, layer in lora_layers(model):
        if layer.active_adapters:
            return list(layer.active_adapters)
    return []


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s) everywhere; only they are trainable."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            raise ConfigError(f"no adapter named {name!r} on this model (adapters: {', '.join(known) or 'none'})")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if layer.merged_adapters and set(layer.merged_adapters) - set(names):
            layer.unmerge()
        layer.active_adapters = [n for n in names if n in layer.lora_A]
        for n in layer.active_adapters:
            layer.lora_A[n].weight.requires_grad_(True)
            layer.lora_B[n].weight.requires_grad_(True)
            if layer.is_dora(n):
                layer.lora_magnitude_vector[n].requires_grad_(True)
    for _, wrapper in saved_modules(model):
        present = [n for n in names if n in wrapper.modules_to_save]
        wrapper.active_adapter = present[0] if present else None
        if present:
            wrapper.modules_to_save[present[0]].requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapters(model):`` the model computes as its base (merged layers are unmerged meanwhile)."""
    remerge = []
    for _, layer in lora_layers(model):
        if layer.merged_adapters:
            remerge.append((layer, layer._merge_dtype))
            layer.unmerge()
    wrappers = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    for m in wrappers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in wrappers:
            m.disabled = False
        for layer, dtype in remerge:
            layer.merge(dtype)


def delete_adapter(model: nn.Module, name: str) -> None:
    configs = adapter_configs(model)
    if name not in configs:
        raise ConfigError(f"no adapter named {name!r} on this model (adapters: {', '.join(configs) or 'none'})")
    for _, m in lora_layers(model) + saved_modules(model):
        m.delete_adapter(name)
    del configs[name]


# -- merging ------------------------------------------------------------------------
@dataclass
class MergeReport:
    """What :func:`merge_and_unload` did. Errors are relative Frobenius norms ``||q(W) - W|| / ||W||``."""

    merged: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)
    requantize_error: dict[str, float] = field(default_factory=dict)
    requantize_error_overall: float | None = None

    def summary(self) -> str:
        line = f"merged {len(self.merged)} LoRA layers"
        if self.requantized:
            worst = max(self.requantize_error, key=self.requantize_error.get)
            line += (f"; re-quantized {len(self.requantized)} to 4-bit: added relative error "
                     f"{self.requantize_error_overall:.3%} overall, worst {self.requantize_error[worst]:.3%} ({worst})")
        return line


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None, requantize: bool = False) -> MergeReport:
    """Replace every LoRA layer by one plain layer with weight ``W0 + sum_a s_a B_a A_a`` (active adapters).

    ``W0`` is dequantized for a 4-bit base; the sum is formed in float32 and the
    new ``nn.Linear`` is stored in ``dtype`` (default: the base weight's dtype,
    or the 4-bit layer's compute dtype). A 4-bit base is re-quantized only when
    ``requantize=True``, with its own settings; the report then gives the error
    that re-quantizing added, per layer and overall. ``modules_to_save``
    wrappers are replaced by the active adapter's trained copy. The model no
    longer has adapters afterwards.
    """
    report = MergeReport()
    err_sq = ref_sq = 0.0
    for name, layer in lora_layers(model):
        original = layer._base_before_merge or layer.base
        weight = layer.merged_weight(torch.float32)
        if requantize and is_4bit(original):
            new = rebuilt_base(original, weight)
            err = torch.linalg.matrix_norm(new.dequantize(torch.float32) - weight).item()
            ref = torch.linalg.matrix_norm(weight).item()
            report.requantized.append(name)
            report.requantize_error[name] = err / max(ref, 1e-30)
            err_sq, ref_sq = err_sq + err**2, ref_sq + ref**2
        else:
            target = dtype or (original.compute_dtype if is_4bit(original) else original.weight.dtype)
            new = dense_layer(weight, layer.base.bias, target, conv1d_layout(original))
        set_submodule(model, name, new)
        report.merged.append(name)
    for name, wrapper in saved_modules(model):
        set_submodule(model, name, wrapper.active_module())
    if report.requantized:
        report.requantize_error_overall = math.sqrt(err_sq / max(ref_sq, 1e-30))
    model.__dict__.pop(CONFIGS_ATTR, None)
    return report


# -- combining ------------------------------------------------------------------------
def add_weighted_adapter(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    combination: str = "linear",
    rank: int | None = None,
) -> LoraConfig:
    """A new adapter whose update is ``sum_i w_i s_i B_i A_i`` per layer; returns its config (added inactive).

    * ``"cat"``: the factors are concatenated, ``A = [A_1; A_2; ...]`` and
      ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] / s``: exact, rank ``sum r_i``.
    * ``"linear"``: the same sum reduced to rank ``rank`` (default ``max r_i``)
      by a truncated SVD, computed on the small ``sum r_i`` core (QR of the
      stacked factors), never on the full ``out x in`` matrix. Exact when the
      sum's rank is at most ``rank``, otherwise its best rank-``rank``
      approximation. (Summing the A's and the B's separately would add cross
      terms ``B_i A_j``; neither mode does.)

    The new adapter uses ``alpha`` of the first adapter and plain (non-rs) scaling.
    """
    configs = adapter_configs(model)
    _check_combination(configs, names, weights, new_name, combination, rank)
    alpha = float(configs[names[0]].alpha)
    ranks: dict[str, int] = {}
    for layer_name, layer in lora_layers(model):
        present = [(n, w) for n, w in zip(names, weights) if n in layer.lora_A]
        if not present:
            continue
        a_cat = torch.cat([layer.lora_A[n].weight.detach().double() for n, _ in present])
        b_cat = torch.cat([layer.lora_B[n].weight.detach().double() * (w * layer.scaling[n])
                           for n, w in present], dim=1)
        if combination == "linear":
            new_rank = min(rank or max(layer.r[n] for n, _ in present), a_cat.shape[0])
            a_cat, b_cat = _truncate_product(a_cat, b_cat, new_rank)
        new_rank = a_cat.shape[0]
        layer.add_adapter(new_name, new_rank, alpha)
        with torch.no_grad():
            layer.lora_A[new_name].weight.copy_(a_cat)
            layer.lora_B[new_name].weight.copy_(b_cat / layer.scaling[new_name])
        ranks[layer_name] = new_rank
    if not ranks:
        raise ConfigError(f"adapters {list(names)} adapt no layer of this model")
    common = Counter(ranks.values()).most_common(1)[0][0]
    config = LoraConfig(r=common, alpha=alpha, target_modules=list(ranks),
                        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != common},
                        base_model_name_or_path=configs[names[0]].base_model_name_or_path).validate()
    configs[new_name] = config
    set_adapter(model, active_adapters(model) or [new_name])
    return config


def _check_combination(configs: dict[str, LoraConfig], names: Sequence[str], weights: Sequence[float], new_name: str,
                       combination: str, rank: int | None) -> None:
    if combination not in ("linear", "cat"):
        raise ConfigError(f"combination {combination!r} is not one of: linear, cat")
    if not names or len(names) != len(weights):
        raise ConfigError(f"give one weight per adapter: {len(names)} adapters, {len(weights)} weights")
    for n in names:
        if n not in configs:
            raise ConfigError(f"no adapter named {n!r} on this model (adapters: {', '.join(configs) or 'none'})")
        if configs[n].modules_to_save:
            raise ConfigError(f"adapter {n!r} trains modules in full (modules_to_save); those cannot be combined")
        if configs[n].use_dora:
            raise ConfigError(f"adapter {n!r} is a DoRA adapter; its magnitudes do not combine linearly")
    if new_name in configs:
        raise ConfigError(f"the model already has an adapter named {new_name!r}; pick another name")
    if rank is not None and rank <= 0:
        raise ConfigError(f"rank {rank} must be a positive integer")


def _truncate_product(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` of rank k with ``B' A'`` the best rank-k approximation of ``B @ A`` (no out x in matrix formed)."""
    qb, rb = torch.linalg.qr(b)          # B = Qb Rb
    qa, ra = torch.linalg.qr(a.t())      # A^T = Qa Ra
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]) @ qa.t(), (qb @ u[:, :k]) * root


# -- state -----------------------------------------------------------------------------
def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (``base_model.model.<module>.lora_A.weight``, a DoRA magnitude
    ``...<module>.lora_magnitude_vector``; modules_to_save by module path)."""
    if adapter_name not in adapter_configs(model):
        raise ConfigError(f"no adapter named {adapter_name!r} on this model")
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
            if layer.is_dora(adapter_name):
                state[f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}"] = layer.lora_magnitude_vector[adapter_name].detach()
    for name, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                state[f"{PEFT_PREFIX}{name}.{key}"] = tensor.detach()
    return state
