"""``loraq export`` as a function: a model (plain, 4-bit, or with an adapter merged) -> one GGUF file.

* ``export(model=M, out=...)``: a Hugging Face folder (or hub id, ``.gguf``, the
  default model) or a bitsandbytes 4-bit folder (dequantized), read one
  tensor at a time from its files;
* ``export(adapter=A, out=...)``: the adapter on the base it was trained on,
  loaded as ``loraq merge`` loads it, each layer merged (``W0 + s B A``) only
  when its turn to be written comes;
* ``export(adapter=A, format="gguf-lora", out=...)``: the adapter alone as a
  llama.cpp LoRA file.

Beside ``X.gguf`` it writes the Ollama ``X.Modelfile``. Nothing is written
on any error: the GGUF goes to a temporary sibling, renamed at the end; an
existing ``out`` is replaced only with ``overwrite``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from loraq.errors import ConfigError, LoraqError
from loraq.export.gguf import FILE_TYPES, QUANTS

FORMATS = ("gguf", "gguf-lora")
INTO = ("auto", "dequantized", "original", "requantized")


def export(
    model: str | Path | None = None,
    adapter: str | Path | None = None,
    out: str | Path | None = None,
    quant: str = "q8_0",
    format: str = "gguf",
    into: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (a GGUF, or a GGUF LoRA with ``format="gguf-lora"``); returns a report (see the module docstring)."""
    out = _check_arguments(model, adapter, out, quant, format, into, overwrite)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    if format == "gguf-lora":
        report = _export_lora(adapter, model, out, into, allow_pickle, trust_remote_code, say)
    elif adapter is not None:
        report = _export_adapted(adapter, model, out, quant, into, allow_pickle, trust_remote_code, say)
    else:
        report = _export_folder(model, out, quant, trust_remote_code, say)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _check_arguments(model, adapter, out, quant, format, into, overwrite) -> Path:
    if out is None:
        raise ConfigError("--out is required: the .gguf file to write")
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is not one of: {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant!r} is not one of: {', '.join(QUANTS)}")
    if into not in INTO:
        raise ConfigError(f"--into {into!r} is not one of: {', '.join(INTO)}")
    if into == "requantized":
        raise ConfigError("--into requantized does not apply to GGUF: the GGUF's own types are chosen with --quant")
    if format == "gguf-lora" and adapter is None:
        raise ConfigError("--format gguf-lora needs --adapter: the adapter to write")
    out = Path(out)
    if out.is_dir():
        raise LoraqError(f"--out {out} is a folder; give the .gguf file to write")
    for path in (out, _modelfile_for(out, format)):
        if path is not None and path.exists() and not overwrite:
            raise LoraqError(f"--out: {path} exists; pass --overwrite to replace it or choose another name")
    for given in (model, adapter):
        if given is not None and Path(given).exists() and Path(given).resolve() == out.resolve():
            raise LoraqError(f"--out {out} is an input of this export; write to another file")
    return out


def _modelfile_for(out: Path, format: str) -> Path | None:
    from loraq.export.modelfile import modelfile_path

    return modelfile_path(out) if format == "gguf" else None


def _export_folder(model, out: Path, quant: str, trust_remote_code: bool, say) -> dict[str, Any]:
    """A model read from its files, tensor by tensor (a 4-bit folder dequantized)."""
    from transformers import AutoConfig

    from loraq.export.tensors import folder_tensors
    from loraq.models.hf_calls import quiet_transformers
    from loraq.models.load import check_loadable, load_tokenizer
    from loraq.models.source import resolve_source

    source = resolve_source(None if model is None else str(model))
    label = source.origin or source.name
    check_loadable(source, trust_remote_code=trust_remote_code)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    with folder_tensors(source.path, config, label) as tensors:
        return _write_model(tensors, config, tokenizer, source.name, out, quant, say)


def _export_adapted(adapter, model, out: Path, quant: str, into: str, allow_pickle: bool, trust_remote_code: bool,
                    say) -> dict[str, Any]:
    """The adapter on its base, each layer merged when written."""
    from loraq.export.tensors import model_tensors

    loaded, name = load_adapted_model(adapter, model, into, allow_pickle, trust_remote_code)
    report = _write_model(model_tensors(loaded.model), loaded.model.config, loaded.tokenizer, name, out, quant, say)
    report["adapter"] = str(adapter)
    return report


def _write_model(tensors, config, tokenizer, name: str, out: Path, quant: str, say) -> dict[str, Any]:
    from loraq.data.tokenize import chat_template
    from loraq.export.gguf import plan_tensors, prepare_for, write_gguf
    from loraq.export.gguf_arch import family_for, hyperparameters, string, u32
    from loraq.export.gguf_tokenizer import tokenizer_metadata
    from loraq.export.modelfile import modelfile_path, modelfile_text, stop_strings
    from loraq.paths import atomic_write_text

    family = family_for(config)
    plan = plan_tensors(family, config, tensors, quant)
    n_vocab = next(t.shape[0] for t in plan if t.name == "token_embd.weight")
    metadata = {"general.type": string("model"), "general.name": string(name),
                "general.file_type": u32(FILE_TYPES[quant])}
    if quant not in ("f32", "f16", "bf16"):
        metadata["general.quantization_version"] = u32(2)
    metadata.update(hyperparameters(config, family))
    metadata.update(tokenizer_metadata(tokenizer, n_vocab, _template_text(chat_template(tokenizer))))
    say(f"loraq: writing {out} ({family.name}, {quant}, {len(plan)} tensors) ...")
    report = write_gguf(out, family.arch, metadata, plan, prepare_for(family, config), say)
    atomic_write_text(modelfile_path(out), modelfile_text(out, stop_strings(tokenizer)))
    return {"out": str(out), "modelfile": str(modelfile_path(out)), "format": "gguf", "quant": quant,
            "arch": family.arch, "family": family.name, "name": name, **report,
            "types": _type_counts(plan)}


def _export_lora(adapter, model, out: Path, into: str, allow_pickle: bool, trust_remote_code: bool,
                 say) -> dict[str, Any]:
    from loraq.export.gguf import write_gguf
    from loraq.export.gguf_arch import family_for
    from loraq.export.lora_gguf import lora_metadata, lora_plan

    loaded, name = load_adapted_model(adapter, model, into, allow_pickle, trust_remote_code)
    config = loaded.model.config
    family = family_for(config)
    plan = lora_plan(loaded.model, family, config)
    say(f"loraq: writing {out} (LoRA for {family.name}, {len(plan) // 2} layers) ...")
    report = write_gguf(out, family.arch, lora_metadata(family, name), plan, lambda _name, w: w, say)
    return {"out": str(out), "format": "gguf-lora", "arch": family.arch, "family": family.name, "name": name,
            "adapter": str(adapter), "layers": len(plan) // 2, **report}


def load_adapted_model(adapter, model, into: str, allow_pickle: bool, trust_remote_code: bool):
    """(loaded model with the adapter's LoRA layers unmerged, the name to write in general.name)."""
    from loraq.lora.api import base_model_for
    from loraq.lora.files import load_adapter, read_adapter_config
    from loraq.models.load import load_model

    config = read_adapter_config(adapter)
    base = model if model is not None else base_model_for(config.base_model_name_or_path)
    method = "lora" if into == "original" else "qlora"
    loaded = load_model(base, method=method, dtype="fp32", device="cpu", allow_pickle=False,
                        trust_remote_code=trust_remote_code)
    load_adapter(loaded.model, adapter, allow_pickle=allow_pickle)
    return loaded, f"{loaded.source.name} + {Path(adapter).name}"


def _template_text(template: Any) -> str | None:
    if isinstance(template, dict):
        return template.get("default") or next(iter(template.values()), None)
    return template


def _type_counts(plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in plan:
        counts[t.type.name] = counts.get(t.type.name, 0) + 1
    return counts
