"""Which layers of a model get a LoRA adapter.

A *linear layer* is an ``nn.Linear``, a transformers ``Conv1D`` (GPT-2's
transposed linear layer, which PEFT adapts with ``fan_in_fan_out``) or a loraq
``Linear4bit`` (a layer already wrapped by LoRA counts as the layer it wraps). ``target_modules`` selects among
them, with PEFT's meaning:

* a list: an entry ``t`` selects the layer named ``n`` when ``n == t`` or
  ``n`` ends with ``"." + t`` (a suffix such as ``q_proj`` or
  ``self_attn.q_proj``); a loraq entry ``"re:<regex>"`` selects the names the
  regex matches in full;
* a single string: a regex that must match the whole name (``"re:"`` optional);
* ``"all-linear"``: every linear layer except the output head.

Then ``exclude_modules`` (same syntax) removes layers, ``layers_to_transform``
keeps only layers whose index (the first ``.N.`` in the name, e.g.
``model.layers.3.mlp.up_proj`` -> 3) is listed, and ``modules_to_save`` are
never LoRA targets (they are trained in full instead).
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import torch.nn as nn

from loraq.errors import ConfigError
from loraq.lora.config import ALL_LINEAR, LoraConfig
from loraq.modules import output_head_name

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def linear_types() -> tuple[type, ...]:
    """nn.Linear, transformers' Conv1D, and loraq's Linear4bit."""
    from loraq.modules import conv1d_type
    from loraq.quant.linear import Linear4bit

    conv1d = conv1d_type()
    return (nn.Linear, Linear4bit) + ((conv1d,) if conv1d is not None else ())


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not look inside loraq's wrappers (their insides are LoRA's own)."""
    from loraq.lora.layer import LoraLinear, ModulesToSave

    def walk(prefix: str, module: nn.Module):
        yield prefix, module
        if isinstance(module, (LoraLinear, ModulesToSave)):
            return
        for name, child in module.named_children():
            yield from walk(f"{prefix}.{name}" if prefix else name, child)

    yield from walk("", model)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Every linear layer of the model (nn.Linear, Conv1D, Linear4bit, or one already wrapped by LoRA), in order."""
    from loraq.lora.layer import LoraLinear

    kinds = linear_types() + (LoraLinear,)
    return [name for name, module in iter_modules(model) if name and isinstance(module, kinds)]


def layer_index(name: str) -> int | None:
    """The block index in a name like ``model.layers.3.mlp.up_proj`` (the first numeric segment), or None."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def name_matches(name: str, spec: list[str] | str) -> bool:
    """Does a module name match a target/exclusion spec (list of suffixes / ``re:`` entries, or one regex)?"""
    if isinstance(spec, str):
        return _entry_matches(name, spec if spec.startswith("re:") else "re:" + spec)
    return any(_entry_matches(name, entry) for entry in spec)


def _entry_matches(name: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the linear layers ``config`` adapts, in module order; ConfigError when a target matches nothing."""
    linear = linear_layer_names(model)
    head = output_head_name(model)
    spec = config.target_modules
    if spec == ALL_LINEAR or spec == [ALL_LINEAR]:
        chosen = [n for n in linear if n != head]
    else:
        # a single string is a regex over the whole name (PEFT's meaning of a str)
        entries = [spec if spec.startswith("re:") else "re:" + spec] if isinstance(spec, str) else list(spec)
        chosen_set: set[str] = set()
        for entry in entries:
            if entry == ALL_LINEAR:
                hits = [n for n in linear if n != head]
            else:
                _check_regex(entry)
                hits = [n for n in linear if _entry_matches(n, entry)]
            if not hits:
                raise ConfigError(_nothing_matched(model, f"target_modules {entry!r}", linear))
            chosen_set.update(hits)
        chosen = [n for n in linear if n in chosen_set]
    if config.exclude_modules:
        excluded = config.exclude_modules
        excluded = ["re:" + excluded.removeprefix("re:")] if isinstance(excluded, str) else list(excluded)
        for entry in excluded:
            _check_regex(entry)
        chosen = [n for n in chosen if not name_matches(n, excluded)]
    if config.modules_to_save:
        chosen = [n for n in chosen if not _inside_any(n, config.modules_to_save)]
    if config.layers_to_transform:
        wanted = set(int(i) for i in config.layers_to_transform)
        before = chosen
        chosen = [n for n in chosen if layer_index(n) in wanted]
        if not chosen:
            indices = sorted({i for i in map(layer_index, before) if i is not None})
            have = f"{indices[0]}..{indices[-1]}" if indices else "none"
            raise ConfigError(f"layers_to_transform {sorted(wanted)} selects no targeted layer; "
                              f"the targeted layers' indices are {have}")
    if not chosen:
        raise ConfigError(_nothing_matched(model, "target_modules after exclude_modules/modules_to_save", linear))
    return chosen


def _inside_any(name: str, modules: list[str]) -> bool:
    """``name`` is one of ``modules`` (by suffix) or lies inside one of them."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(_entry_matches(p, m) for p in prefixes for m in modules)


def resolve_modules_to_save(model: nn.Module, modules_to_save: list[str]) -> list[str]:
    """Full names of the modules that ``modules_to_save`` entries (suffixes) name; ConfigError for one that
    names nothing."""
    names = [n for n, _ in iter_modules(model) if n]
    found: list[str] = []
    for entry in modules_to_save:
        hits = [n for n in names if _entry_matches(n, entry)]
        if not hits:
            raise ConfigError(f"modules_to_save {entry!r} names no module of this model "
                              f"(top-level modules: {', '.join(n for n, _ in model.named_children())})")
        found.extend(h for h in hits if h not in found)
    return found


def shorten_names(names: list[str]) -> list[str]:
    """Unique names with the block prefix dropped: ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    out: list[str] = []
    for name in names:
        match = _LAYER_INDEX.search(name)
        short = name[match.end():] if match else name
        if short not in out:
            out.append(short)
    return out


def _nothing_matched(model: nn.Module, what: str, linear: list[str]) -> str:
    short = ", ".join(shorten_names(linear)) or "none"
    return f"{what} matches no linear layer of this model; its linear layers are: {short}"


def _check_regex(entry: str) -> None:
    pattern = entry[3:] if entry.startswith("re:") else None
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"target/exclude pattern {entry!r} is not a valid regular expression ({exc})") from None
