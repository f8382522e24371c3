"""``loraq export`` as a function: a model (plain, 4-bit, or with an adapter merged) -> one GGUF file.

* ``export(model=M, out=...)``: a Hugging Face folder (or hub id, ``.gguf``, the
  default model) or a bitsandbytes 4-bit folder (dequantized), read one
  tensor at a time from its files;
* ``export(adapter=A, out=...)``: the adapter merged (``W0 + s B A`` in float32)
  into the base ``loraq merge`` puts it on (``into``): for a QLoRA adapter the
  4-bit base it was trained on, held in memory (4-bit, small) and each layer
  dequantized and merged only when its turn to be written comes; for
  ``original`` (any other adapter) the base's files read tensor by tensor
  and the adapter's update added to each tensor it touches, so the
  full-precision base is never in memory;
* ``export(adapter=A, format="gguf-lora", out=...)``: the adapter alone as a
  llama.cpp LoRA file, for the base model's GGUF (checked against the base's
  architecture; no weights are read).

Beside ``X.gguf`` it writes the Ollama ``X.Modelfile``. Nothing is written
on any error: the GGUF goes to a temporary sibling, renamed at the end. An
existing ``out`` is replaced only with ``overwrite``, and only if it is a
GGUF file.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraq.choices import EXPORT_FORMATS, GGUF_QUANTS, MERGE_INTO
from loraq.errors import ConfigError


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
    ignore_base_fingerprint: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (a GGUF, or a GGUF LoRA with ``format="gguf-lora"``); returns a report (module docstring)."""
    out = _check_arguments(model, adapter, out, quant, format, into, overwrite)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    if adapter is None:
        from loraq.models.source import resolve_source

        source = resolve_source(None if model is None else str(model))
        report = _export_files(source, out, quant, trust_remote_code, say)
    else:
        report = _export_adapter(adapter, model, out, quant, format, into, allow_pickle, trust_remote_code,
                                 ignore_base_fingerprint, say)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _export_adapter(adapter, model, out: Path, quant: str, format: str, into: str, allow_pickle: bool,
                    trust_remote_code: bool, ignore_base_fingerprint: bool, say) -> dict[str, Any]:
    """The merged model (``into`` as ``loraq merge`` resolves it), or with ``gguf-lora`` the adapter alone."""
    from loraq.api.merge import resolve_into
    from loraq.lora.adapted import load_adapted, plan_base

    plan = plan_base(adapter, model, base="auto", allow_pickle=allow_pickle,
                     ignore_base_fingerprint=ignore_base_fingerprint, warn=lambda m: say(f"warning: {m}"))
    into = resolve_into(into, plan.record)
    name = f"{plan.source.name} + {Path(adapter).resolve().name}"
    if format == "gguf-lora":
        _check_lora_file_base(plan.record, say)
    if format == "gguf-lora" or into == "original":
        report = _export_files(plan.source, out, quant, trust_remote_code, say, adapter=adapter,
                               allow_pickle=allow_pickle, name=name, lora_only=format == "gguf-lora")
    else:  # the 4-bit base it was trained on, in memory (small); each layer dequantized and merged when written
        from loraq.exporting.tensors import model_tensors

        loaded = load_adapted(adapter, model, base="trained", dtype="fp32", device="cpu", allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code, ignore_base_fingerprint=ignore_base_fingerprint,
                              say=say)
        report = _write_model(model_tensors(loaded.model), loaded.model.config, loaded.tokenizer,
                              loaded.model.generation_config, name, out, quant, say)
    return {**report, "adapter": str(adapter), "into": "-" if format == "gguf-lora" else into}


def _check_lora_file_base(record, say) -> None:
    """llama.cpp adds a LoRA file to whatever base GGUF it is given: the original weights, for a user who
    converts the base as it is. An adapter whose init changed the frozen base cannot work there; a QLoRA
    adapter does, as ``--into original`` (its correction for the 4-bit rounding is applied to weights
    that have none), which the user is told."""
    if record is None:
        return
    if record.replays_init and not record.initial_factors_appended:
        raise ConfigError(f"this adapter's init ({record.init}) changed the frozen base, so as a LoRA file on "
                          "the original base GGUF it would not be the model you trained: export it merged "
                          "(loraq export --adapter A --out model.gguf)")
    if record.quant is not None:
        say(f"note: trained on the {record.describe()}; llama.cpp applies this LoRA file to the base GGUF you "
            "load, which is the model `--into original` gives. For the model you trained, export it merged.")


def _check_arguments(model, adapter, out, quant, format, into, overwrite) -> Path:
    from loraq.exporting.gguf import check_gguf_output

    if out is None:
        raise ConfigError("--out is required: the .gguf file to write")
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {format!r} is not one of: {', '.join(EXPORT_FORMATS)}")
    if quant not in GGUF_QUANTS:
        raise ConfigError(f"--quant {quant!r} is not one of: {', '.join(GGUF_QUANTS)}")
    if into not in MERGE_INTO:
        raise ConfigError(f"--into {into!r} is not one of: {', '.join(MERGE_INTO)}")
    if into == "requantized":
        raise ConfigError("--into requantized does not apply to GGUF: choose the file's own types with --quant")
    if format == "gguf-lora" and adapter is None:
        raise ConfigError("--format gguf-lora needs --adapter: the adapter to write")
    out = Path(out)
    check_gguf_output(out, overwrite, inputs=[model, adapter], modelfile=format == "gguf")
    return out


def _export_files(source, out: Path, quant: str, trust_remote_code: bool, say, adapter=None,
                  allow_pickle: bool = False, name: str | None = None, lora_only: bool = False) -> dict[str, Any]:
    """From the model's files, tensor by tensor (a 4-bit folder dequantized), an adapter's files merged in."""
    from loraq.exporting.adapter_files import read_updates, with_updates
    from loraq.exporting.tensors import folder_tensors
    from loraq.models.hf_calls import quiet_transformers
    from loraq.models.load import check_loadable, load_tokenizer
    from loraq.models.skeleton import build_skeleton

    label = source.origin or source.name
    check_loadable(source, trust_remote_code=trust_remote_code)
    with quiet_transformers():
        skeleton = build_skeleton(source.path, torch.float32, trust_remote_code, label)  # no weights: meta device
        tokenizer = None if lora_only else load_tokenizer(source, trust_remote_code=trust_remote_code)
    updates = read_updates(skeleton, adapter, allow_pickle=allow_pickle) if adapter is not None else None
    if lora_only:
        return _write_lora(updates, skeleton.config, name, out, say)
    with folder_tensors(source.path, skeleton.config, label) as tensors:
        if updates is not None:
            tensors = with_updates(tensors, updates, skeleton.config)
        return _write_model(tensors, skeleton.config, tokenizer, skeleton.generation_config, name or source.name,
                            out, quant, say)


def _write_model(tensors, config, tokenizer, generation_config, name: str, out: Path, quant: str,
                 say) -> dict[str, Any]:
    from loraq.exporting.gguf import plan_tensors, prepare_for, write_gguf
    from loraq.exporting.gguf_arch import family_for
    from loraq.exporting.metadata import model_metadata
    from loraq.exporting.modelfile import modelfile_path, modelfile_text, stop_strings
    from loraq.paths import atomic_write_text

    family = family_for(config)
    plan = plan_tensors(family, config, tensors, quant)
    metadata = model_metadata(family, config, tokenizer, generation_config, name, quant, plan)
    say(f"loraq: writing {out} ({family.name}, {quant}, {len(plan)} tensors) ...")
    report = write_gguf(out, family.arch, metadata, plan, prepare_for(family, config), say)
    atomic_write_text(modelfile_path(out), modelfile_text(out, stop_strings(tokenizer, generation_config)))
    types: dict[str, int] = {}
    for t in plan:
        types[t.type.name] = types.get(t.type.name, 0) + 1
    return {"out": str(out), "modelfile": str(modelfile_path(out)), "format": "gguf", "quant": quant,
            "arch": family.arch, "family": family.name, "name": name, "types": types, **report}


def _write_lora(updates, config, name: str, out: Path, say) -> dict[str, Any]:
    from loraq.exporting.gguf import write_gguf
    from loraq.exporting.gguf_arch import family_for
    from loraq.exporting.lora_gguf import lora_metadata, lora_plan

    family = family_for(config)
    plan = lora_plan(updates, family, config)
    say(f"loraq: writing {out} (LoRA for {family.name}, {len(plan) // 2} layers) ...")
    report = write_gguf(out, family.arch, lora_metadata(name), plan, lambda _name, w: w, say)
    return {"out": str(out), "format": "gguf-lora", "arch": family.arch, "family": family.name, "name": name,
            "layers": len(plan) // 2, **report}
