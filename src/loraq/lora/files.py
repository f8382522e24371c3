"""Adapter folders in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writing: keys ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``), a DoRA adapter's magnitude
``...lora_magnitude_vector`` (``[out]``); modules trained in full under
``base_model.model.<module>.<param>``. ``fan_in_fan_out`` is true when the
adapted layers are transformers ``Conv1D`` layers (GPT-2), as PEFT writes it;
the factors have the same shapes and meaning either way. The config states exactly the layers
that carry the adapter, and the rank and alpha of each, in terms PEFT reads
(suffixes when they select exactly those layers, else full names; per-layer
ranks/alphas that differ from ``r``/``lora_alpha`` as ``rank_pattern`` /
``alpha_pattern`` entries); a frozen correction of the 4-bit base beside the
adapter (``--init calibrated``) goes to its own file, :mod:`loraq.lora.correction`.
An adapter whose initialisation changed the base
(PiSSA, LoftQ) is written relative to the *unchanged* base::

    W_res + s B A = W0 + s [B, -B0] [A; A0]     (rank 2r, same s)

exactly for PiSSA on a full-precision base; for LoftQ (and PiSSA on 4-bit) up to
the quantization error that LoftQ set out to cancel, which merging into the
full-precision base removes.

Reading is strict: a missing, unexpected or misshapen tensor is an
:class:`~loraq.errors.AdapterError` naming the key (PEFT only warns and keeps
random or zero weights). Pickle files (``adapter_model.bin``) are refused
unless ``allow_pickle=True``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from loraq.errors import AdapterError, ConfigError
from loraq.lora.config import LoraConfig, plain_number
from loraq.lora.correction import correction_tensors, save_correction
from loraq.lora.model import (
    MAGNITUDE_KEY,
    PEFT_PREFIX,
    adapter_configs,
    inject_lora,
    lora_layers,
    lora_state_dict,
    saved_modules,
)
from loraq.lora.targeting import (
    find_targets,
    iter_modules,
    layer_index,
    resolve_modules_to_save,
)
from loraq.modules import linear_features
from loraq.paths import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


# -- writing ------------------------------------------------------------------------
def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter as a PEFT folder (atomically); returns the folder.

    An existing folder is replaced only if it is empty or an adapter folder
    (holds ``adapter_config.json``), never any other folder.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_NAME).is_file())):
        raise AdapterError(f"{out} exists and is not an adapter folder; choose a new or empty folder")
    tensors, peft_config = peft_export(model, adapter_name)
    if base_model_name_or_path is not None:
        peft_config["base_model_name_or_path"] = str(base_model_name_or_path)
    correction = correction_tensors(model, adapter_name)
    with atomic_dir(out, replace=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if correction:  # the calibrated init's frozen correction of the 4-bit base (lora/correction.py)
            save_correction(correction, tmp)
    return out


def peft_export(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, adapter_config)`` exactly as PEFT expects them for this adapter."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r} on this model (adapters: {', '.join(configs) or 'none'})")
    config = configs[adapter_name]
    tensors = {k: v.contiguous().clone() for k, v in lora_state_dict(model, adapter_name).items()}
    actual: dict[str, tuple[int, float]] = {}  # module -> (r, alpha) as written
    converted = fan_in_fan_out = False
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        fan_in_fan_out = fan_in_fan_out or layer.conv1d
        r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        if adapter_name in layer.initial_factors:
            a0, b0 = layer.initial_factors[adapter_name]
            key = f"{PEFT_PREFIX}{name}.lora_"
            tensors[key + "A.weight"] = torch.cat([tensors[key + "A.weight"], a0]).contiguous()
            tensors[key + "B.weight"] = torch.cat([tensors[key + "B.weight"], -b0], dim=1).contiguous()
            r, alpha = 2 * r, alpha * (math.sqrt(2) if config.use_rslora else 2)
            converted = True
        actual[name] = (r, alpha)
    if converted:  # the same doubling, expressed on the config's own r/alpha and patterns
        factor = math.sqrt(2) if config.use_rslora else 2
        config = config.replace(r=2 * config.r, alpha=config.alpha * factor,
                                rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                                alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})
    out = config.to_peft_dict()
    saved = [n for n, w in saved_modules(model) if adapter_name in w.modules_to_save]
    out.update(_peft_targets(model, list(actual), config))
    out.update(_peft_patterns(config, actual))
    out["modules_to_save"] = saved or None
    out["fan_in_fan_out"] = fan_in_fan_out
    return tensors, out


def _peft_targets(model: nn.Module, targets: list[str], config: LoraConfig) -> dict[str, Any]:
    """``target_modules`` (+ ``layers_to_transform``) that make PEFT adapt exactly ``targets``.

    PEFT's rule for a list: a module ``n`` is adapted when ``n`` equals an entry
    or ends with ``"." + entry``, and (with ``layers_to_transform``) its index
    -- the number after the first ``<prefix>.<name>.`` -- is listed; modules
    inside ``modules_to_save`` never are.
    """
    names = [n for n, _ in iter_modules(model) if n]
    saved = {n for n, _ in saved_modules(model)}
    wanted = set(targets)
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})

    def peft_selects(entries: list[str], layers: list[int]) -> set[str]:
        chosen = set()
        for n in names:
            if n in saved or any(n.startswith(s + ".") for s in saved):
                continue
            if not any(n == e or n.endswith("." + e) for e in entries):
                continue
            if layers:
                m = re.match(r".*?\.[^.]*\.(\d+)\.", n)
                if m is None or int(m.group(1)) not in layers:
                    continue
            chosen.add(n)
        return chosen

    if peft_selects(suffixes, []) == wanted:
        return {"target_modules": suffixes, "layers_to_transform": None, "exclude_modules": None}
    layers = sorted({i for i in map(layer_index, targets) if i is not None})
    if layers and peft_selects(suffixes, layers) == wanted:
        return {"target_modules": suffixes, "layers_to_transform": layers, "exclude_modules": None}
    return {"target_modules": sorted(wanted), "layers_to_transform": None, "exclude_modules": None}


def _peft_patterns(config: LoraConfig, actual: dict[str, tuple[int, float]]) -> dict[str, Any]:
    """``r``, ``lora_alpha`` and patterns under which PEFT gives each module its actual (r, alpha).

    The config's own values and patterns are kept; modules they do not describe
    get exact-name entries, placed first because PEFT takes the first match.
    """
    rank_extra, alpha_extra = {}, {}
    for name, (rv, av) in actual.items():
        if config.rank_for(name) != rv:
            rank_extra[re.escape(name)] = rv
        if not math.isclose(config.alpha_for(name), av, rel_tol=1e-12):
            alpha_extra[re.escape(name)] = av
    return {
        "r": config.r,
        "lora_alpha": plain_number(config.alpha),
        "rank_pattern": {**rank_extra, **config.rank_pattern},
        "alpha_pattern": {k: plain_number(v) for k, v in {**alpha_extra, **config.alpha_pattern}.items()},
    }


# -- reading ------------------------------------------------------------------------
def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """The folder's ``adapter_config.json`` as a :class:`LoraConfig`; AdapterError for a missing or bad folder."""
    folder = _adapter_folder(adapter_dir)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                           "(as written by `loraq train` or PEFT's save_pretrained)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc}); the file is damaged") from None
    return LoraConfig.from_peft_dict(data, source=str(path))


def read_adapter_tensors(adapter_dir: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The folder's tensors (safetensors; a pickle ``adapter_model.bin`` only with ``allow_pickle=True``)."""
    folder = _adapter_folder(adapter_dir)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for damaged files
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AdapterError(f"{path} is not a readable safetensors file ({reason}); "
                               "it is damaged or incomplete") from None
    pickle_path = folder / PICKLE_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise AdapterError(f"{folder} holds only {PICKLE_NAME}, a pickle file that can run code when loaded; "
                               f"convert it to {WEIGHTS_NAME}, or pass --allow-pickle if you trust its source")
        try:
            state = torch.load(str(pickle_path), map_location="cpu", weights_only=True)
        except Exception as exc:
            from loraq.models.hf_calls import exception_line

            raise AdapterError(f"{pickle_path} could not be read ({exception_line(exc)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{pickle_path} is not a mapping of names to tensors")
        return state
    raise AdapterError(f"{folder} has no {WEIGHTS_NAME}; the adapter folder is incomplete")


def _adapter_folder(adapter_dir: str | Path) -> Path:
    folder = Path(adapter_dir)
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise AdapterError(f"{folder} is a file; give the adapter folder (holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    return folder


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    adapter_name: str = "default",
    allow_pickle: bool = False,
) -> LoraConfig:
    """Add the adapter saved in ``adapter_dir`` (PEFT's format) to ``model``; returns its config.

    Everything is checked before the model is touched: the config's targets
    must exist in the model, and the file must hold exactly the expected
    tensors with the expected shapes; anything else is an AdapterError naming
    the key. On error the model is unchanged.
    """
    if adapter_name in adapter_configs(model):
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}; load this one under another name")
    config, tensors = checked_adapter(model, adapter_dir, allow_pickle=allow_pickle)
    install_adapter(model, config, tensors, adapter_name)
    return config


def install_adapter(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Add an adapter whose tensors :func:`checked_adapter` checked against ``model`` under ``adapter_name``."""
    inject_lora(model, config, adapter_name, initialise=False)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
                layer.lora_B[adapter_name].weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
                if layer.is_dora(adapter_name):
                    layer.lora_magnitude_vector[adapter_name].copy_(tensors[f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}"])
        for name, wrapper in saved_modules(model):
            if adapter_name in wrapper.modules_to_save:
                module = wrapper.modules_to_save[adapter_name]
                module.load_state_dict({k: tensors[f"{PEFT_PREFIX}{name}.{k}"] for k in module.state_dict()})


def checked_adapter(model: nn.Module, adapter_dir: str | Path,
                    allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors, checked to fit ``model`` exactly (a weightless meta-device model will do)."""
    folder = _adapter_folder(adapter_dir)
    config = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder, allow_pickle=allow_pickle)
    check_adapter_tensors(model, config, tensors, folder)
    return config, tensors


def check_adapter_tensors(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
                          folder: str | Path) -> None:
    """AdapterError unless ``tensors`` are exactly what ``config`` needs on ``model`` (keys and shapes)."""
    _check_tensors(tensors, _expected_shapes(model, config, Path(folder)), config, Path(folder))


def _expected_shapes(model: nn.Module, config: LoraConfig, folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (module name, shape) for every tensor the adapter must hold on this model."""
    try:
        targets = find_targets(model, config)
        saved = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    except ConfigError as exc:
        raise AdapterError(f"adapter {folder} does not fit this base model: {exc} "
                           f"(adapter made for: {config.base_model_name_or_path or 'unknown'})") from None
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in targets:
        in_features, out_features = linear_features(model.get_submodule(name))
        r = config.rank_for(name)
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (name, (r, in_features))
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (name, (out_features, r))
        if config.use_dora:
            expected[f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}"] = (name, (out_features,))
    for name in saved:
        module = model.get_submodule(name)
        module = getattr(module, "original_module", module)
        for key, tensor in module.state_dict().items():
            expected[f"{PEFT_PREFIX}{name}.{key}"] = (name, tuple(tensor.shape))
    return expected


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[str, tuple[int, ...]]],
                   config: LoraConfig, folder: Path) -> None:
    where = f"adapter {folder}"
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AdapterError(f"{where}: {WEIGHTS_NAME} lacks {missing[0]} for layer {expected[missing[0]][0]}{more}; "
                           "the file is incomplete or belongs to another adapter_config.json")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise AdapterError(f"{where}: unexpected tensor {unexpected[0]}{more}: adapter_config.json does not target "
                           "that module in this model, or the adapter was made for another base model")
    for key, (module_name, shape) in expected.items():
        got = tuple(tensors[key].shape)
        if got == shape:
            continue
        is_a = key.endswith(".lora_A.weight")
        is_b = key.endswith(".lora_B.weight")
        r = config.rank_for(module_name)
        rank_dim = got[0] if is_a else got[1] if (is_b and len(got) == 2) else None
        feature_ok = len(got) == 2 and ((is_a and got[1] == shape[1]) or (is_b and got[0] == shape[0]))
        if (is_a or is_b) and feature_ok and rank_dim != r:
            raise AdapterError(f"{where}: {key} has rank {rank_dim} but adapter_config.json gives {module_name} r={r}; "
                               "the config and the weights do not belong together")
        raise AdapterError(f"{where}: {key} is {list(got)} but layer {module_name} of this base model needs "
                           f"{list(shape)}; the adapter was made for another base model "
                           f"({config.base_model_name_or_path or 'unknown'})")
