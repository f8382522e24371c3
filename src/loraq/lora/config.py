"""What one LoRA adapter is: its rank, scale, targets and initialisation.

:class:`LoraConfig` is loraq's own view of an adapter; :meth:`LoraConfig.to_peft_dict`
and :meth:`LoraConfig.from_peft_dict` translate to and from PEFT's
``adapter_config.json`` (field names in ../../shared/REFERENCE.md).

Per module, the update is ``s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), where ``r`` and ``alpha`` come from the first matching
``rank_pattern`` / ``alpha_pattern`` key, else from ``r`` / ``alpha``. A pattern
key matches a module name ``n`` when ``re.match(rf"(.*\\.)?({key})$", n)`` does
(PEFT's rule: a suffix such as ``q_proj`` or a regex over the dotted name).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from loraq.choices import INITS
from loraq.errors import AdapterError, ConfigError

ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # a list of module-name suffixes (entries may be "re:<regex>"), a single regex
    # string (PEFT's meaning of a str), or "all-linear"
    target_modules: list[str] | str = field(default_factory=lambda: [ALL_LINEAR])
    exclude_modules: list[str] | str = field(default_factory=list)
    layers_to_transform: list[int] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False  # DoRA (loraq.lora.dora): a trained magnitude per output besides B A
    init: str = "default"
    loftq_iters: int = 5
    correction_rank: int = 0  # calibrated: rank of the frozen fit beside the adapter (0: the adapter's rank)
    base_model_name_or_path: str | None = None

    # ------------------------------------------------------------------
    @classmethod
    def from_train_config(cls, cfg: Any) -> LoraConfig:
        """The LoRA part of a :class:`loraq.config.TrainConfig`."""
        return cls(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                   exclude_modules=list(cfg.exclude_modules),
                   layers_to_transform=[int(i) for i in cfg.layers_to_transform],
                   rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
                   modules_to_save=list(cfg.modules_to_save), use_rslora=bool(cfg.rslora),
                   use_dora=bool(cfg.dora), init=cfg.init,
                   loftq_iters=cfg.loftq_iters, correction_rank=cfg.correction_rank,
                   base_model_name_or_path=cfg.model).validate()

    def fit_rank(self, r: int) -> int:
        """The rank of the calibrated init's frozen fit beside an adapter of rank ``r``: ``correction_rank``, or
        ``r`` when that is 0; 0 for the other inits (no fit)."""
        return (self.correction_rank or r) if self.init == "calibrated" else 0

    def validate(self) -> LoraConfig:
        """Ranges and choices; raises ConfigError naming the setting."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank {self.r!r} must be a positive integer (--rank)")
        if not _positive_number(self.alpha):
            raise ConfigError(f"LoRA alpha {self.alpha!r} must be a number > 0 (--alpha)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout {self.dropout!r} must be in [0, 1) (--dropout)")
        if self.init not in INITS:
            raise ConfigError(f"--init {self.init!r} is not one of: {', '.join(INITS)}")
        if not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ConfigError(f"--loftq-iters {self.loftq_iters!r} must be an integer >= 1")
        if isinstance(self.correction_rank, bool) or not isinstance(self.correction_rank, int) \
                or self.correction_rank < 0:
            raise ConfigError(f"--correction-rank {self.correction_rank!r} must be an integer >= 0")
        if not self.target_modules:
            raise ConfigError("--target-modules is empty; give module-name suffixes, 're:<regex>' or all-linear")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] = {rank!r} must be a positive integer")
        for key, alpha in self.alpha_pattern.items():
            if not _positive_number(alpha):
                raise ConfigError(f"alpha_pattern[{key!r}] = {alpha!r} must be a number > 0")
        for key in (*self.rank_pattern, *self.alpha_pattern):
            _compile(key, "rank_pattern/alpha_pattern key")
        return self

    # ------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    # ------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` fields.

        ``target_modules`` is written as given when it is a plain list or a str;
        :func:`loraq.lora.files.save_adapter` replaces it by the exact module set
        so PEFT adapts the same layers whatever loraq-only syntax was used.
        """
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": plain_number(self.alpha),
            "lora_dropout": float(self.dropout),
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules or None,
            "layers_to_transform": list(self.layers_to_transform) or None,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": {k: plain_number(v) for k, v in self.alpha_pattern.items()},
            "modules_to_save": list(self.modules_to_save) or None,
            "use_rslora": bool(self.use_rslora),
            "use_dora": bool(self.use_dora),
            # the layout of the model's layers, not of the adapter: files.peft_export sets it for Conv1D models
            "fan_in_fan_out": False,
            "bias": "none",
            "lora_bias": False,
            # the weights in the file are relative to the unmodified base (see files.py),
            # so PEFT must not run an initialisation that changes the base weight
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read PEFT's fields; features loraq does not implement are errors, not silent drops.

        ``fan_in_fan_out`` describes the base layers' storage (Conv1D), which loraq reads from the model
        itself for each layer, as PEFT in effect does (it overrides a wrong value per layer, with a warning).
        """
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise AdapterError(f"{source}: peft_type {peft_type!r} is not supported; loraq reads LoRA adapters only")
        if data.get("lora_bias") is True:
            raise AdapterError(f"{source}: lora_bias=true (LoRA bias terms) is not supported by loraq")
        if data.get("bias", "none") not in ("none", None):
            raise AdapterError(f"{source}: bias={data['bias']!r} is not supported; "
                               "loraq adapters train no bias (bias 'none')")
        if data.get("layers_pattern"):
            raise AdapterError(f"{source}: layers_pattern is not supported; "
                               "use layers_to_transform with '.layers.N.' names")
        for key in ("r", "lora_alpha"):
            if key not in data:
                raise AdapterError(f"{source}: missing {key!r}; a LoRA config must state r and lora_alpha")
        init = data.get("init_lora_weights", True)
        layers = data.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        targets = data.get("target_modules")
        if targets is None:
            raise AdapterError(f"{source}: missing 'target_modules'")
        try:
            cfg = cls(
                r=data["r"], alpha=data["lora_alpha"], dropout=float(data.get("lora_dropout") or 0.0),
                target_modules=targets if isinstance(targets, str) else list(targets),
                exclude_modules=data.get("exclude_modules") or [],
                layers_to_transform=[int(i) for i in (layers or [])],
                rank_pattern=dict(data.get("rank_pattern") or {}), alpha_pattern=dict(data.get("alpha_pattern") or {}),
                modules_to_save=list(data.get("modules_to_save") or []), use_rslora=bool(data.get("use_rslora", False)),
                use_dora=bool(data.get("use_dora", False)),
                init="gaussian" if init == "gaussian" else "default",
                base_model_name_or_path=data.get("base_model_name_or_path"),
            ).validate()
        except ConfigError as exc:
            raise AdapterError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise AdapterError(f"{source}: malformed field ({exc})") from None
        return cfg

    def replace(self, **changes: Any) -> LoraConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return LoraConfig(**values)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _pattern_key(patterns: dict, module_name: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression ({exc})") from None


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def plain_number(value: float) -> int | float:
    # PEFT writes lora_alpha as an int when it is one; keep files diff-friendly
    return int(value) if float(value).is_integer() else float(value)
