"""Build a transformers model without weights, then fill it one tensor at a time.

The low-memory loaders (:mod:`loraq.models.lowmem`, :mod:`loraq.models.prequantized`)
share these steps:

1. :func:`build_skeleton`: the architecture from ``config.json`` under
   ``torch.device("meta")``: every parameter and buffer has a shape and a
   dtype but no storage, so building costs no memory and no init time.
2. :func:`iter_checkpoint_tensors`: the checkpoint's tensors one at a time,
   each read on its own from the file (safetensors with positional reads, not
   a memory map, so pages of tensors already consumed do not stay resident),
   the heap trimmed after each so freed memory really goes back. Each key is
   renamed as transformers renames it on load (:func:`checkpoint_key_renamer`:
   GPT-NeoX files name the head ``embed_out``, the module is ``lm_head``).
3. :func:`set_tensor`: put each tensor into the model (quantized layers
   replace their ``nn.Linear`` with ``model.set_submodule``).
4. :func:`finish`: tie the tied weights, compute the non-persistent buffers
   (rotary frequencies) the way transformers initialises them, and refuse a
   model in which anything is still on the meta device (a tensor the files
   lack).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from loraq.errors import ModelError
from loraq.models.hf_calls import LOAD_ERRORS, exception_line
from loraq.models.safety import WeightFiles

log = logging.getLogger(__name__)


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool, label: str) -> nn.Module:
    """The causal-LM architecture of ``folder`` on the meta device, parameters in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise ModelError(f"--model {label}: cannot build this architecture ({exception_line(exc)})") from None
    model.config.name_or_path = str(folder)
    if (Path(folder) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except LOAD_ERRORS as exc:  # an invalid generation config does not stop loading, as in transformers
            log.warning("ignoring %s/generation_config.json: %s", folder, exception_line(exc))
    return model


def tied_targets(model: nn.Module) -> set[str]:
    """Parameter names that the model ties to another one (e.g. ``lm_head.weight``); never read from files."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def checkpoint_key_renamer(model: nn.Module, label: str) -> Callable[[str], str]:
    """``file key -> model key`` by the renamings transformers applies when it loads this architecture.

    transformers keeps, per architecture, the renamings between the names in
    the files and its modules' names (``conversion_mapping.py``; e.g. GPT-NeoX's
    ``embed_out.`` -> ``lm_head.``) and applies them in ``from_pretrained``;
    a loader that reads keys itself must apply them too. Conversions that
    combine several tensors into one (MoE experts fused into one tensor) cannot
    be done one tensor at a time: a key that needs one is an error.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings names its modules as its files
        return lambda key: key
    transforms = get_model_conversion_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        renamed, converted_by = rename_source_key(key, renamings, converters)
        if converted_by is not None:
            raise ModelError(f"--model {label}: tensor {key} needs transformers' weight conversion "
                             f"({converted_by}), which low-memory loading does not do; use --method lora")
        return renamed

    return rename


def iter_checkpoint_tensors(files: WeightFiles, label: str, rename: Callable[[str], str] | None = None,
                            wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for every tensor of the checkpoint, one at a time, on the CPU; keys passed through
    ``rename`` (:func:`checkpoint_key_renamer`) when given; a key ``wanted`` says no to is skipped (from
    safetensors, not even read)."""
    for path in files.files:
        try:
            if files.format == "safetensors":
                yield from _safetensors_tensors(path, rename, wanted)
            else:  # pickle, allowed by the caller; weights_only refuses anything but tensors
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                for raw in list(state):
                    tensor, key = state.pop(raw), rename(raw) if rename is not None else raw
                    if wanted is None or wanted(key):
                        yield key, tensor
        except LOAD_ERRORS as exc:
            raise ModelError(f"--model {label}: cannot load its weights from {path.name} "
                             f"({exception_line(exc)})") from None


def open_safetensors(path: Path):
    """A safetensors handle that reads each tensor with positional reads (a memory map where that is missing)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors without the pread backend: memory-mapped instead
        return safe_open(str(path), framework="pt", device="cpu")


def _safetensors_tensors(path: Path, rename: Callable[[str], str] | None,
                         wanted: Callable[[str], bool] | None) -> Iterator[tuple[str, torch.Tensor]]:
    with open_safetensors(path) as f:
        for raw in f.keys():
            key = rename(raw) if rename is not None else raw
            if wanted is None or wanted(key):
                yield key, f.get_tensor(raw)
                release_freed_memory()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Without it, glibc keeps the full-precision tensors' freed chunks in the
    heap (its mmap threshold grows after the first large free), and the
    resident size creeps up layer after layer as if nothing had been freed.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def module_and_leaf(model: nn.Module, key: str) -> tuple[str, nn.Module, str] | None:
    """``(module name, module, leaf)`` holding parameter/buffer ``key``; None when the model has no such tensor.

    A checkpoint of the bare base model (keys without the ``model.`` prefix of
    the causal-LM wrapper) is matched too, as transformers matches it.
    """
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (key, f"{prefix}.{key}" if prefix else None):
        if candidate is None:
            continue
        module_name, _, leaf = candidate.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if leaf in module._parameters or leaf in module._buffers:
            return module_name, module, leaf
    return None


def missing_tensors_error(label: str, missing: list[str], hint: str = "") -> ModelError:
    return ModelError(f"--model {label}: the weight files lack {len(missing)} tensors of this architecture "
                      f"(first: {missing[0]}); the checkpoint is incomplete or does not match config.json{hint}")


def set_tensor(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``leaf`` of ``module`` by ``value`` (a parameter keeps requires_grad)."""
    if leaf in module._parameters:
        old = module._parameters[leaf]
        requires_grad = old.requires_grad if value.is_floating_point() else False
        module._parameters[leaf] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        module._buffers[leaf] = value


def finish(model: nn.Module, device: torch.device, label: str) -> None:
    """Tie weights, compute non-persistent buffers, and check that nothing is left on the meta device."""
    if tied_targets(model):
        model.tie_weights()
    _init_non_persistent_buffers(model, device, label)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise missing_tensors_error(label, missing, " (if transformers itself reads it, try --method lora)")


def _stand_aside(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """Swap the module's own loaded parameters and saved buffers for meta stand-ins (an init rule writing them
    writes nothing); returns what to put back."""
    loaded = []
    for table in (module._parameters, module._buffers):
        for leaf, tensor in list(table.items()):
            initialised_here = table is module._buffers and leaf in module._non_persistent_buffers_set
            if tensor is None or tensor.is_meta or initialised_here:
                continue
            loaded.append((table, leaf, tensor))
            stand_in = torch.empty_like(tensor, device="meta")
            table[leaf] = nn.Parameter(stand_in, requires_grad=False) if isinstance(tensor, nn.Parameter) else stand_in
    return loaded


def _init_non_persistent_buffers(model: nn.Module, device: torch.device, label: str) -> None:
    """Buffers that are never saved (rotary inverse frequencies): computed by transformers' own init rule.

    Each is first filled with NaN; a buffer that the init rule does not write
    stays NaN and is refused rather than used. The init rule of a module
    initialises its weights too (Gemma's scaled embedding owns ``embed_scale``):
    the module's loaded tensors stand aside meanwhile, so only the buffers are written.
    """
    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta and leaf in module._non_persistent_buffers_set:
                module._buffers[leaf] = torch.full(buf.shape, float("nan"), dtype=buf.dtype, device=device) \
                    if buf.is_floating_point() else torch.zeros(buf.shape, dtype=buf.dtype, device=device)
                owners[name] = module
    with torch.no_grad():
        for module in owners.values():
            loaded = _stand_aside(module)
            try:
                model._init_weights(module)
            finally:
                for table, leaf, tensor in loaded:
                    table[leaf] = tensor
    for name, module in owners.items():
        for leaf in module._non_persistent_buffers_set:
            buf = module._buffers.get(leaf)
            if buf is not None and buf.is_floating_point() and bool(torch.isnan(buf).any()):
                raise ModelError(f"--model {label}: low-memory loading cannot compute buffer {name}.{leaf} of this "
                                 "architecture; use --method lora")

