"""A base model with an adapter on it, rebuilt the way the adapter was trained.

The one place where a command (generate, chat, eval, merge, export) decides
which base an adapter goes on:

* which model: ``--model`` when given, else the base the adapter names
  (its training record, :mod:`loraq.lora.record`, or PEFT's
  ``base_model_name_or_path``); a recorded fingerprint that the model's
  weights do not match is an error naming both (``ignore_base_fingerprint``
  overrides it);
* which weights (``base``):

  - ``"auto"`` / ``"trained"``: the base as it was trained -- for a QLoRA
    adapter its 4-bit base with the recorded settings; for PiSSA / LoftQ the
    initialisation is replayed on the original weights (it changed the frozen
    base), the replayed initial factors are checked against those stored in
    the file, and the trained factors (the file's first r) are applied; for
    the calibrated init, the frozen correction stored beside the adapter
    (:mod:`loraq.lora.correction`) joins the 4-bit base. An adapter with no
    record (made elsewhere): ``"auto"`` assumes a full-precision base,
    ``"trained"`` QLoRA's usual 4-bit base;
  - ``"original"``: the full-precision weights, the file applied as PEFT
    applies it (PiSSA / LoftQ files are relative to those weights; a
    calibrated adapter's correction stays out: it corrects the 4-bit base).

  ``quant`` ("nf4" / "fp4") asks for a 4-bit base with that code instead.

One line says which base was chosen.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraq.errors import ConfigError, ModelError
from loraq.lora.config import LoraConfig
from loraq.lora.record import QuantSettings, TrainingBase, read_training_base
from loraq.models.load import LoadedModel
from loraq.models.source import ModelSource

BASES = ("auto", "trained", "original")
FILE_ADAPTER = "loraq-file"  # the file's adapter while the trained half is taken out of it
REPLAY_TOLERANCE = 1e-4  # relative difference of the replayed initial factors that still counts as the same base


@dataclass(frozen=True)
class BasePlan:
    """The base an adapter is applied to: ``quant`` None = full precision in ``dtype``."""

    source: ModelSource
    quant: QuantSettings | None
    dtype: str
    record: TrainingBase | None
    trained: bool  # the base as the record says it was trained (replay / split apply)
    message: str

    @property
    def replays_init(self) -> bool:
        return self.trained and self.record is not None and self.record.replays_init

    @property
    def corrects_base(self) -> bool:
        """The trained base is the 4-bit one plus the frozen correction stored beside the adapter."""
        return self.trained and self.record is not None and self.record.base_correction

    @property
    def splits_factors(self) -> bool:
        return self.trained and self.record is not None and self.record.initial_factors_appended


def plan_base(adapter: str | Path, model: str | Path | None = None, *, base: str = "auto", quant: str | None = None,
              dtype: str = "auto", allow_pickle: bool = False, ignore_base_fingerprint: bool = False,
              warn: Callable[[str], None] | None = None) -> BasePlan:
    """Decide the base for ``adapter`` (see the module docstring), loading no weights."""
    from loraq.lora.files import read_adapter_config

    if base not in BASES:
        raise ConfigError(f"base {base!r} is not one of: {', '.join(BASES)}")
    config = read_adapter_config(adapter)
    record = read_training_base(adapter, warn or _warn)
    source = resolve_adapter_base(config, record, model, allow_pickle=allow_pickle,
                                  ignore_base_fingerprint=ignore_base_fingerprint)
    return _choose_weights(source, record, base, quant, dtype)


def _choose_weights(source: ModelSource, record: TrainingBase | None, base: str, quant: str | None,
                    dtype: str) -> BasePlan:
    recorded = record.quant if record is not None else None
    if source.quantized:
        if base == "original":
            raise ModelError(f"--model {source.origin or source.name} is a 4-bit checkpoint: it has no full-precision "
                             "weights to apply the adapter to; pass the original model with --model")
        settings = recorded or QuantSettings()
        return BasePlan(source, settings, _dtype(dtype, record), record, record is not None,
                        f"applying the adapter to the 4-bit checkpoint {source.name}")
    if quant is not None and (recorded is None or quant != recorded.quant_type):
        settings = QuantSettings(quant, *(_settings_tail(recorded)))
        return BasePlan(source, settings, _dtype(dtype, record), record, False,
                        f"applying the adapter to a 4-bit base ({settings.describe()}), as asked")
    if record is None:
        if base == "trained":
            return BasePlan(source, QuantSettings(), _dtype(dtype, None), None, False,
                            "no record of the base this adapter was trained on (made elsewhere); assuming QLoRA's "
                            f"usual 4-bit base ({QuantSettings().describe()})")
        return BasePlan(source, None, _dtype(dtype, None), None, False,
                        "no record of the base this adapter was trained on (made elsewhere); assuming a "
                        "full-precision base")
    if base == "original":
        note = f"; it was trained on a 4-bit base ({recorded.describe()})" if recorded else ""
        return BasePlan(source, None, _dtype(dtype, None), record, False,
                        f"applying the adapter to the full-precision base, as asked{note}")
    return BasePlan(source, recorded, _dtype(dtype, record), record, True,
                    f"applying the adapter to the {record.describe()}")


def _settings_tail(recorded: QuantSettings | None) -> tuple[bool, int]:
    default = recorded or QuantSettings()
    return default.double_quant, default.blocksize


def _dtype(dtype: str, record: TrainingBase | None) -> str:
    return record.compute_dtype if dtype == "auto" and record is not None else dtype


def resolve_adapter_base(config: LoraConfig, record: TrainingBase | None, model: str | Path | None, *,
                         allow_pickle: bool = False, ignore_base_fingerprint: bool = False) -> ModelSource:
    """The model an adapter goes on: ``model`` if given, else the one it names; checked against the record."""
    from loraq.models.source import resolve_source

    named = record.base_model.name_or_path if record is not None else config.base_model_name_or_path
    spec = str(model) if model is not None else base_model_for(named)
    source = resolve_source(spec, allow_pickle=allow_pickle)
    expected = record.base_model.fingerprint if record is not None else None
    if expected and not ignore_base_fingerprint:
        found = source_fingerprint(source)
        if found is not None and found != expected:
            given = f"--model {model}" if model is not None else f"the model at {source.origin or source.name}"
            raise ModelError(f"{given} is not the base this adapter was trained on ({named}, weights {expected}; these "
                             f"are {found}); pass that model with --model, "
                             "or --ignore-base-fingerprint to apply it anyway")
    return source


def base_model_for(name: str | None) -> str | None:
    """The ``--model`` spec for a recorded base name (None: the default model).

    A local path that exists, or a hub id (``org/name``); the default model
    when the adapter names none or names the default; an error for a path
    that is not there (applying the adapter to some other model would be
    silently wrong).
    """
    import re

    from loraq.models.default import DEFAULT_HUB_ID, DEFAULT_MODEL_NAME

    name = (name or "").strip()
    if not name or name in (DEFAULT_HUB_ID, DEFAULT_MODEL_NAME):
        return None
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) and not name.startswith((".", "~")):
        return name
    raise ModelError(f"the adapter was trained on {name!r}, which does not exist here; pass that model with --model "
                     "(another model needs --ignore-base-fingerprint too)")


def source_fingerprint(source: ModelSource) -> str | None:
    """The weights fingerprint of a resolved model (None for pickle-only folders)."""
    from loraq.models.fingerprint import weights_fingerprint
    from loraq.models.safety import weight_files

    files = weight_files(source.path, allow_pickle=True)
    return weights_fingerprint(files.files) if files.format == "safetensors" else None


def load_adapted(adapter: str | Path, model: str | Path | None = None, *, base: str = "auto", quant: str | None = None,
                 dtype: str = "auto", device: str | torch.device | None = None, allow_pickle: bool = False,
                 trust_remote_code: bool = False, ignore_base_fingerprint: bool = False,
                 say: Callable[[str], None] | None = None) -> LoadedModel:
    """The base (see :func:`plan_base`) with the adapter on it, unmerged, in eval mode."""
    from loraq.lora.files import load_adapter

    tell = say or _warn
    plan = plan_base(adapter, model, base=base, quant=quant, dtype=dtype, allow_pickle=allow_pickle,
                     ignore_base_fingerprint=ignore_base_fingerprint, warn=lambda m: tell(f"warning: {m}"))
    loaded = load_planned_base(plan, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device=device)
    if plan.splits_factors:
        _apply_trained_half(loaded, adapter, plan, allow_pickle, lambda m: tell(f"warning: {m}"))
    else:
        load_adapter(loaded.model, adapter, allow_pickle=allow_pickle)
    if plan.corrects_base:
        from loraq.lora.correction import load_correction

        load_correction(loaded.model, adapter)
    tell(plan.message)  # once it is done: a mistake found while loading stays the only line
    loaded.model.eval()
    return loaded


def load_planned_base(plan: BasePlan, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                      device: str | torch.device | None = None) -> LoadedModel:
    """The base :func:`plan_base` chose, without the adapter (LoftQ's replay starts from float32 weights)."""
    from loraq.models.load import load_model

    q = plan.quant or QuantSettings()
    loftq = plan.replays_init and plan.record.init == "loftq"
    method = "lora" if (plan.quant is None or loftq) and not plan.source.quantized else "qlora"
    return load_model(plan.source, method=method, dtype="fp32" if loftq else plan.dtype, quant=q.quant_type,
                      double_quant=q.double_quant, blocksize=q.blocksize, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, device=device)


def _apply_trained_half(loaded: LoadedModel, adapter: str | Path, plan: BasePlan, allow_pickle: bool,
                        warn: Callable[[str], None]) -> None:
    """The file's ``[B, -B0] [A; A0]``: replay the init that made ``A0, B0`` (when it changed the base),
    keep ``B, A``."""
    from loraq.devices import resolve_dtype
    from loraq.lora.files import load_adapter
    from loraq.lora.model import cast_frozen, delete_adapter, inject_lora, set_adapter

    model, record = loaded.model, plan.record
    file_config = load_adapter(model, adapter, adapter_name=FILE_ADAPTER, allow_pickle=allow_pickle)
    trained = trained_config(file_config, record)
    compute = resolve_dtype(plan.dtype)
    quant = None
    if record.init == "loftq":
        q = plan.quant or QuantSettings()
        quant = {"quant_type": q.quant_type, "double_quant": q.double_quant, "blocksize": q.blocksize,
                 "compute_dtype": compute}
    inject_lora(model, trained, "default", quant=quant, initialise=plan.replays_init)
    worst = _take_trained_half(model, plan.replays_init)
    delete_adapter(model, FILE_ADAPTER)
    set_adapter(model, "default")
    if record.init == "loftq":
        cast_frozen(model, compute)
    if worst is not None and worst[0] > REPLAY_TOLERANCE:
        warn(f"replaying the {record.init} initialisation gave initial factors that differ from the adapter file's "
             f"(relative {worst[0]:.2e} in {worst[1]}): the base or the software differs from the training run's")


def trained_config(file_config: LoraConfig, record: TrainingBase) -> LoraConfig:
    """The trained adapter's config from the file's (whose ranks and alphas the appended factors doubled)."""
    factor = math.sqrt(2) if file_config.use_rslora else 2.0
    return file_config.replace(
        r=file_config.r // 2, alpha=file_config.alpha / factor, init=record.init,
        loftq_iters=record.loftq_iters or file_config.loftq_iters,
        rank_pattern={k: v // 2 for k, v in file_config.rank_pattern.items()},
        alpha_pattern={k: v / factor for k, v in file_config.alpha_pattern.items()})


def _take_trained_half(model: torch.nn.Module, compare: bool) -> tuple[float, str] | None:
    """Copy the file adapter's first r factors into ``default``; the worst mismatch of the replayed ``A0, B0``."""
    from loraq.lora.model import lora_layers, saved_modules

    worst: tuple[float, str] | None = None
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if "default" not in layer.lora_A:
                continue
            r = layer.r["default"]
            a_file, b_file = layer.lora_A[FILE_ADAPTER].weight, layer.lora_B[FILE_ADAPTER].weight
            layer.lora_A["default"].weight.copy_(a_file[:r])
            layer.lora_B["default"].weight.copy_(b_file[:, :r])
            if layer.is_dora("default"):  # m is the same for the file's rank-2r form and the trained half
                layer.lora_magnitude_vector["default"].copy_(layer.lora_magnitude_vector[FILE_ADAPTER])
            if compare and "default" in layer.initial_factors:
                a0, b0 = layer.initial_factors["default"]
                diff = max(_relative(a0, a_file[r:]), _relative(b0, -b_file[:, r:]))
                if worst is None or diff > worst[0]:
                    worst = (diff, name)
            # saved again, the adapter is written relative to the untouched base as the file was
            layer.initial_factors["default"] = (a_file[r:].detach().clone(), -b_file[:, r:].detach().clone())
        for _, wrapper in saved_modules(model):
            if "default" in wrapper.modules_to_save:
                wrapper.modules_to_save["default"].load_state_dict(wrapper.modules_to_save[FILE_ADAPTER].state_dict())
    return worst


def _relative(expected: torch.Tensor, got: torch.Tensor) -> float:
    scale = float(expected.abs().max()) or 1.0
    return float((expected.float() - got.float()).abs().max()) / scale


def _warn(message: str) -> None:
    import sys

    print(f"loraq: {message}", file=sys.stderr, flush=True)
