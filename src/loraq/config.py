"""The run configuration: one dataclass that the CLI flags, YAML recipes and the
Python API all fill in.

A recipe's keys are the flag names (``max-steps`` or ``max_steps``); flags given
on the command line override the recipe; :meth:`TrainConfig.validate` turns every
unknown key, wrong type, out-of-range value or contradiction into one
:class:`~loraq.errors.ConfigError` line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from loraq.choices import (
    COMPUTE_DTYPES,
    FORMATS,
    IMPORTANCE_LEVELS,
    INITS,
    LOSS_TYPES,
    METHODS,
    NONFINITE,
    OBJECTIVES,
    PREFERENCE_OBJECTIVES,
    QUANT_TYPES,
    SCALE_REWARDS,
    SCHEDULES,
    TRACKERS,
)
from loraq.errors import ConfigError

AUTO = "auto"  # a field with auto=True takes this word besides a number


def opt(default: Any = None, help: str = "", *, choices: Iterable[str] | None = None, lo: float | None = None,
        hi: float | None = None, flag: str | None = None, list_sep: bool = False, factory: Any = None,
        cli: bool = True, auto: bool = False, repeat: bool = False):
    """A field with the metadata that drives argparse and validation (``auto``: the word "auto" is accepted
    besides a number, for the caller to resolve before use; ``repeat``: a list given by repeating the flag, each
    value whole)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "lo": lo, "hi": hi, "flag": flag,
            "list_sep": list_sep, "cli": cli, "auto": auto, "repeat": repeat}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------
    model: str | None = opt(None, "HF folder, hub id, .gguf file or pre-quantized folder "
                                  "(default: SmolLM2-135M-Instruct)")
    method: str = opt("qlora", "qlora: 4-bit frozen base + LoRA; lora: LoRA on a 16/32-bit base; "
                               "full: every weight", choices=METHODS)
    dtype: str = opt("auto", "compute dtype; "
                             "auto = bf16 where the hardware computes it natively, else fp32", choices=COMPUTE_DTYPES)
    quant: str = opt("nf4", "4-bit code for --method qlora", choices=QUANT_TYPES)
    double_quant: bool = opt(True, "quantize the 4-bit scales again (QLoRA's double quantization)")
    blocksize: int = opt(64, "4-bit quantization block size (power of two, 32..4096)", lo=32, hi=4096)
    allow_pickle: bool = opt(False, "allow loading .bin/.pt pickle weight files "
                                    "(runs code from the file: only for files you trust)")
    trust_remote_code: bool = opt(False, "allow a model folder's own Python code to run")
    # --- LoRA ------------------------------------------------------------
    rank: int = opt(16, "LoRA rank r", lo=1, hi=4096)
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora)", lo=0)
    dropout: float = opt(0.0, "dropout on the LoRA input", lo=0, hi=0.99)
    target_modules: list = opt(help="comma-separated module-name suffixes, 're:<regex>', or all-linear",
                               list_sep=True, factory=lambda: ["all-linear"])
    exclude_modules: list = opt(help="comma-separated module-name suffixes (or 're:<regex>') to leave out",
                                list_sep=True, factory=list)
    layers_to_transform: list = opt(help="comma-separated layer indices to adapt (default: all)",
                                    list_sep=True, factory=list)
    rank_pattern: dict = opt(help="per-module rank overrides (recipe only): {pattern: rank}", factory=dict, cli=False)
    alpha_pattern: dict = opt(help="per-module alpha overrides (recipe only): {pattern: alpha}",
                              factory=dict, cli=False)
    modules_to_save: list = opt(help="comma-separated modules trained in full and saved with the adapter",
                                list_sep=True, factory=list)
    rslora: bool = opt(False, "rank-stabilised LoRA: scale alpha/sqrt(r)")
    dora: bool = opt(False, "DoRA, weight-decomposed LoRA: a trained magnitude per output row besides B A "
                            "(PEFT's use_dora)")
    loraplus_lr_ratio: float = opt(1.0, "LoRA+: B's learning rate is this multiple of --lr (A's); 1 = plain LoRA, "
                                        "the paper suggests ~16", lo=0, hi=1e6)
    init: str = opt("default", "adapter initialisation", choices=INITS)
    loftq_iters: int = opt(5, "LoftQ alternating iterations (with --init loftq)", lo=1, hi=100)
    calibration_data: str | None = opt(None, "data file whose activations --init calibrated fits the adapter to "
                                             "(default: the training data)")
    calibration_samples: int = opt(256, "rows of the calibration data used by --init calibrated", lo=1, hi=1 << 20)
    correction_rank: int = opt(0, "rank of --init calibrated's frozen fit of the 4-bit error, beside the adapter "
                                  "(0: the adapter's --rank; higher recovers more of the 4-bit loss, frozen: no "
                                  "gradients or optimizer state)", lo=0, hi=1 << 16)
    # --- data ------------------------------------------------------------
    data: str | None = opt(None, "training data: .jsonl/.json/.csv/.parquet/.arrow, a datasets save_to_disk "
                                 "folder or a hub dataset id (default: the bundled demo set)")
    data_split: str | None = opt(None, "split of a Hugging Face dataset in --data (default: train)")
    data_config: str | None = opt(None, "configuration (subset) of a hub dataset in --data")
    val_data: str | None = opt(None, "validation data: a file, save_to_disk folder or hub id (its validation split)")
    val_fraction: float = opt(0.0, "hold out this fraction of --data for validation", lo=0, hi=0.5)
    format: str = opt("auto", "data format (auto-detected by default)", choices=FORMATS)
    seq_len: int = opt(512, "maximum tokens per sequence", lo=8, hi=1 << 20)
    packing: bool = opt(False, "pack several examples per sequence (attention never crosses examples)")
    train_on_inputs: bool = opt(False, "also train on prompt tokens (default: assistant/completion tokens only)")
    skip_bad_examples: bool = opt(False, "leave malformed records out (counted and reported) "
                                         "instead of stopping at the first")
    # --- the objective ---------------------------------------------------
    objective: str = opt("sft", "sft: next-token loss on the answers; dpo: direct preference optimisation on "
                                "prompt/chosen/rejected pairs; orpo: SFT loss plus the odds-ratio term (no reference)",
                         choices=OBJECTIVES)
    beta: float = opt(0.1, "DPO: scale of the log-ratio to the reference (higher: stay closer to it); GRPO: "
                           "weight of the KL term to the adapter-off model (default 0 there: no reference pass)",
                      lo=0)
    label_smoothing: float = opt(0.0, "DPO: assumed share of flipped preference labels (conservative DPO)", lo=0,
                                 hi=0.49)
    orpo_lambda: float = opt(0.1, "ORPO: weight of the odds-ratio term beside the SFT loss", lo=0)
    # GRPO (TRL 1.16 GRPOConfig's names and defaults)
    reward: list = opt(help="grpo: a reward function (repeat the flag for several): exact_answer[:COLUMN], "
                            "regex:PATTERN, length:N, json[:SCHEMA.json], or path/to/file.py:function",
                       factory=list, repeat=True)
    reward_weights: list = opt(help="grpo: comma-separated weights, one per --reward (default: 1 each)",
                               list_sep=True, factory=list)
    num_generations: int = opt(8, "grpo: completions sampled per prompt (a group)", lo=2, hi=1024)
    max_completion_length: int = opt(256, "grpo: new tokens per completion at most", lo=1, hi=1 << 20)
    temperature: float = opt(1.0, "grpo: sampling temperature of the completions (and of their log-probabilities)",
                             lo=0.01, hi=100)
    top_p: float = opt(1.0, "grpo: nucleus sampling: keep the smallest set of tokens with this much probability",
                       lo=0.01, hi=1)
    epsilon: float = opt(0.2, "grpo: clip the importance weight below at 1 - epsilon", lo=0, hi=1)
    epsilon_high: float | None = opt(None, "grpo: clip it above at 1 + epsilon-high (default: --epsilon)", lo=0)
    loss_type: str = opt("dapo", "grpo: how token losses are averaged: dapo (over the step's completion tokens), "
                                 "grpo (per completion, then over completions), bnpo (over the micro-batch's "
                                 "tokens), dr_grpo (over completions x --max-completion-length)", choices=LOSS_TYPES)
    scale_rewards: str = opt("group", "grpo: divide advantages by the group's reward std, the batch's, or none",
                             choices=SCALE_REWARDS)
    num_iterations: int = opt(1, "grpo: optimizer steps on each batch of completions (> 1: clipped off-policy "
                                 "steps)", lo=1, hi=64)
    mask_truncated_completions: bool = opt(False, "grpo: leave completions cut by --max-completion-length out "
                                                  "of the loss")
    importance_sampling_level: str = opt("token", "grpo: importance weights per token or per sequence",
                                         choices=IMPORTANCE_LEVELS)
    init_adapter: str | None = opt(None, "dpo/orpo: start from this run's adapter (an SFT run folder); the model "
                                         "as it starts is the reference and a copy of the adapter trains")
    # --- the loop --------------------------------------------------------
    max_steps: int = opt(-1, "optimizer steps (-1: run --epochs)", lo=-1)
    epochs: float = opt(1.0, "passes over the training data when --max-steps is -1", lo=0)
    batch_size: int | str = opt(4, "sequences per micro-batch (per rank); auto: the largest the memory plan says fits",
                                lo=1, hi=1 << 16, auto=True)
    grad_accum: int = opt(1, "micro-batches per optimizer step", lo=1, hi=1 << 16)
    lr: float = opt(2e-4, "peak learning rate", lo=0, hi=10)
    embedding_lr: float | None = opt(None, "learning rate of modules trained in full beside LoRA (--modules-to-save, "
                                           "e.g. embed_tokens, lm_head) and, with --method full, of the input and "
                                           "output embeddings (default: --lr)", lo=0, hi=10)
    warmup: float = opt(0.03, "warmup: a fraction of the steps if < 1, else a number of steps", lo=0)
    schedule: str = opt("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    weight_decay: float = opt(0.0, "AdamW weight decay", lo=0, hi=1)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)", lo=0)
    grad_checkpointing: bool = opt(False, "recompute activations in backward: less memory, more time")
    seed: int = opt(0, "random seed (data order, initialisation, dropout)", lo=0)
    nonfinite: str = opt("stop", "on a NaN/inf loss or gradient: stop naming the step, "
                                 "or skip the step and count it", choices=NONFINITE)
    # --- evaluation, logging and files ------------------------------------
    eval_every: int = opt(0, "evaluate the validation loss every N steps (0: at the end only)", lo=0)
    eval_samples: int = opt(64, "examples with reference answers used for exact-match accuracy (0: none)", lo=0)
    save_every: int = opt(0, "checkpoint every N steps (0: only the final adapter)", lo=0)
    keep_checkpoints: int = opt(2, "checkpoints kept (the newest K)", lo=1)
    log_every: int = opt(1, "write a metrics line every N steps", lo=1)
    report_to: list = opt(help=f"experiment trackers that get the metrics too: {','.join(TRACKERS)} (any subset; "
                               "each needs its extra, e.g. pip install 'loraq[tensorboard]')",
                          list_sep=True, factory=list)
    output_dir: str | None = opt(None, "run folder (default: runs/<name>)")
    name: str | None = opt(None, "run name (default: <method>-<data>-<date>)")
    resume: bool = opt(False, "continue from the newest complete checkpoint in --output-dir (an error when it "
                              "holds none)")
    auto_resume: bool = opt(False, "continue from the newest complete checkpoint in --output-dir when there is "
                                   "one, else start the run there (for restart loops)")
    overwrite: bool = opt(False, "replace an existing non-empty --output-dir")
    # --- scale-out and speed ---------------------------------------------
    nproc: int = opt(1, "processes to launch through torchrun (DDP)", lo=1, hi=1024)
    fsdp: bool = opt(False, "shard the frozen base across ranks with FSDP2 (fully_shard)")
    threads: int = opt(0, "CPU threads (0: PyTorch's default)", lo=0, hi=1024)
    force: bool = opt(False, "start even when the memory plan (`loraq plan`) says the run does not fit")

    # fields the user set explicitly (flags or recipe); drives contradiction checks
    explicit: set = field(default_factory=set, repr=False, compare=False, metadata={"cli": False, "internal": True})

    # ------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.metadata.get("internal")]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping whose keys may use '-' or '_'; unknown keys and wrong types are errors."""
        cfg = cls()
        cfg.update(values, source)
        return cfg

    def update(self, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name: f for f in fields(self) if not f.metadata.get("internal")}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                hint = ([OTHER_TOOLS_NAMES[key]] if key in OTHER_TOOLS_NAMES
                        else difflib.get_close_matches(key, known, n=1))
                more = f" (did you mean '{hint[0].replace('_', '-')}'?)" if hint else ""
                raise ConfigError(f"{source}: unknown key '{raw_key}'{more}; see `loraq train --help` for the keys")
            setattr(self, key, _coerce(known[key], value, source, raw_key))
            self.explicit.add(key)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def validate(self) -> TrainConfig:
        """Ranges, choices and contradictions; raises ConfigError naming the flag."""
        for f in fields(self):
            if f.metadata.get("internal"):
                continue
            value = getattr(self, f.name)
            flag = _flag(f.name)
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(choices)}")
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            if f.metadata.get("auto") and value == AUTO:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if value != value:  # NaN
                    raise ConfigError(f"{flag} must be a number, not NaN")
                if lo is not None and value < lo:
                    raise ConfigError(f"{flag} {value} is below its minimum {lo}")
                if hi is not None and value > hi:
                    raise ConfigError(f"{flag} {value} is above its maximum {hi}")
        if self.blocksize & (self.blocksize - 1):
            raise ConfigError(f"--blocksize {self.blocksize} must be a power of two between 32 and 4096")
        self._validate_method_flags()
        if self.loraplus_lr_ratio <= 0:
            raise ConfigError(f"--loraplus-lr-ratio {self.loraplus_lr_ratio} must be > 0 (1 = plain LoRA)")
        if self.init in ("loftq", "calibrated") and self.method != "qlora":
            raise ConfigError(f"--init {self.init} corrects 4-bit quantization error and needs --method qlora")
        for key in ("calibration_data", "calibration_samples", "correction_rank"):
            if key in self.explicit and self.init != "calibrated":
                raise ConfigError(f"{_flag(key)} applies to --init calibrated only; drop it or add --init calibrated")
        for flag in ("resume", "auto_resume"):
            if getattr(self, flag) and self.overwrite:
                raise ConfigError(f"{_flag(flag)} and --overwrite contradict each other: "
                                  f"{_flag(flag)} continues the run in --output-dir, --overwrite replaces it")
        if self.val_data and self.val_fraction:
            raise ConfigError("--val-data and --val-fraction both give a validation set; use one")
        if self.max_steps == 0:
            raise ConfigError("--max-steps 0 trains nothing; give a positive number or -1 to run --epochs")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ConfigError("--epochs must be positive when --max-steps is -1")
        if self.fsdp and self.nproc < 2 and "nproc" in self.explicit:
            raise ConfigError("--fsdp shards the model across ranks and needs --nproc 2 or more")
        self._validate_objective()
        for name in self.report_to:
            if name not in TRACKERS:
                raise ConfigError(f"--report-to {name!r} is not one of: {', '.join(TRACKERS)}")
        for idx in self.layers_to_transform:
            if not isinstance(idx, int) or idx < 0:
                raise ConfigError(f"--layers-to-transform takes non-negative layer indices, got {idx!r}")
        return self

    def _validate_method_flags(self) -> None:
        """Flags given explicitly that the chosen --method does not use."""
        if self.method != "qlora":
            for key in ("quant", "double_quant", "blocksize"):
                if key in self.explicit:
                    raise ConfigError(f"{_flag(key)} applies to --method qlora only, not --method {self.method}; "
                                      "drop it or use --method qlora")
        if self.method == "full":
            lora_keys = ("rank", "alpha", "dropout", "target_modules", "exclude_modules", "init", "rslora",
                         "layers_to_transform", "rank_pattern", "alpha_pattern", "loftq_iters", "dora",
                         "loraplus_lr_ratio", "correction_rank")
            for key in lora_keys:
                if key in self.explicit:
                    raise ConfigError(f"{_flag(key)} is a LoRA setting and --method full trains every weight; "
                                      "drop it or use --method lora/qlora")

    def _validate_objective(self) -> None:
        preference = self.objective in PREFERENCE_OBJECTIVES
        owners = {"beta": ("dpo", "grpo"), "label_smoothing": ("dpo",), "orpo_lambda": ("orpo",),
                  "init_adapter": (*PREFERENCE_OBJECTIVES, "grpo"), **dict.fromkeys(GRPO_KEYS, ("grpo",))}
        for key, objectives in owners.items():
            if key in self.explicit and self.objective not in objectives:
                raise ConfigError(f"{_flag(key)} applies to --objective {' or '.join(objectives)}, not "
                                  f"--objective {self.objective}; drop it or pass --objective {objectives[0]}")
        if self.objective == "dpo" and self.beta <= 0:
            raise ConfigError(f"--beta {self.beta} must be positive: it scales the log-ratio to the reference "
                              "(0.1 is usual)")
        if self.objective == "grpo":
            self._validate_grpo()
        elif not preference:
            return
        if self.packing:
            raise ConfigError(f"--packing is not supported with --objective {self.objective}: each pair's answers "
                              "are scored as whole rows; drop --packing")
        if self.nproc > 1:
            raise ConfigError(f"--objective {self.objective} runs in one process for now; drop --nproc")
        if self.init_adapter and not Path(self.init_adapter).is_dir():
            raise ConfigError(f"--init-adapter {self.init_adapter}: the folder does not exist; give the run folder "
                              "of the adapter to continue")
        if self.init_adapter and self.method == "full":
            raise ConfigError("--init-adapter continues a LoRA adapter and needs --method lora or qlora, not full")
        adapter_keys = ("rank", "alpha", "target_modules", "exclude_modules", "init", "rslora", "layers_to_transform",
                        "rank_pattern", "alpha_pattern", "modules_to_save")
        for key in adapter_keys if self.init_adapter else ():
            if key in self.explicit:
                raise ConfigError(f"{_flag(key)} and --init-adapter both shape the adapter (it keeps the one it "
                                  "continues); drop one")

    def _validate_grpo(self) -> None:
        if "beta" not in self.explicit:
            self.beta = 0.0  # TRL's GRPO default: no KL term, no reference pass
        if not self.reward:
            raise ConfigError("--objective grpo needs at least one --reward (e.g. --reward exact_answer, "
                              "--reward 'regex:^Answer: .*', --reward my_rewards.py:score)")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"--reward-weights gives {len(self.reward_weights)} weights for {len(self.reward)} "
                              "--reward functions; give one each")
        if self.importance_sampling_level == "sequence" and self.loss_type != "grpo":
            raise ConfigError(f"--importance-sampling-level sequence goes with --loss-type grpo (the "
                              f"{self.loss_type} loss sums tokens, which a weight per sequence would count once per "
                              "token)")


GRPO_KEYS = ("reward", "reward_weights", "num_generations", "max_completion_length", "temperature", "top_p",
             "epsilon", "epsilon_high", "loss_type", "scale_rewards", "num_iterations", "mask_truncated_completions",
             "importance_sampling_level")

# what other fine-tuning tools (transformers' TrainingArguments, PEFT, axolotl) call loraq's keys: named in the
# "did you mean" of an unknown key, never accepted silently
OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "r": "rank", "lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "max_seq_length": "seq_len",
    "sequence_len": "seq_len", "max_length": "seq_len", "model_name_or_path": "model", "base_model": "model",
    "dataset": "data", "train_file": "data", "datasets": "data", "validation_file": "val_data",
    "lr_scheduler_type": "schedule", "lr_scheduler": "schedule", "warmup_ratio": "warmup", "warmup_steps": "warmup",
    "gradient_checkpointing": "grad_checkpointing", "save_steps": "save_every", "eval_steps": "eval_every",
    "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
    "lora_target_modules": "target_modules", "use_rslora": "rslora", "sample_packing": "packing",
    "val_set_size": "val_fraction", "output": "output_dir", "resume_from_checkpoint": "resume",
    "load_in_4bit": "method", "bf16": "dtype", "fp16": "dtype", "torch_dtype": "dtype",
    "dpo_beta": "beta", "max_prompt_length": "seq_len",
    "use_dora": "dora", "peft_use_dora": "dora", "loraplus_lr_embedding": "embedding_lr",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any, source: str, key: str) -> Any:
    """Recipe and API values: accept the natural YAML/Python types, refuse the rest."""
    kind = _kind(f)
    where = f"{source}: '{key}'"
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{where} cannot be empty")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "on", "1", "false", "no", "off", "0"}:
            return value.lower() in {"true", "yes", "on", "1"}
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if f.metadata.get("auto") and isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where} must be an integer{_or_auto(f)}, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer{_or_auto(f)}, got {value!r}") from None
        if number != int(number):
            raise ConfigError(f"{where} must be an integer{_or_auto(f)}, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if kind is list:
        return _coerce_list(f, value, where)
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of pattern to value, got {value!r}")
        return dict(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _coerce_list(f: dataclasses.Field, value: Any, where: str) -> list:
    if isinstance(value, str):
        items = [value.strip()] if f.metadata.get("repeat") else [v.strip() for v in _split_list(value) if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{where} must be a list or a comma-separated string, got {value!r}")
    if f.name == "report_to":  # "none" chooses no tracker, as in transformers' TrainingArguments
        return [str(v).strip().lower() for v in items if str(v).strip().lower() != "none"]
    numbers = {"layers_to_transform": (int, "layer indices like 0,1,2"),
               "reward_weights": (float, "numbers like 1,0.5")}
    if f.name in numbers:
        kind, what = numbers[f.name]
        try:
            return [kind(v) for v in items]
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {what}, got {value!r}") from None
    return [str(v) for v in items]


def _or_auto(f: dataclasses.Field) -> str:
    return " or auto" if f.metadata.get("auto") else ""


def _int_or_auto(text: str) -> int | str:
    """argparse type of a field that takes a number or "auto"."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def _split_list(value: str) -> list[str]:
    # a single 're:' pattern may itself contain commas, so it is taken whole
    if value.strip().startswith("re:"):
        return [value.strip()]
    return value.split(",")


def _kind(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" | None", "").split(" | ")[0].strip()
    return {"bool": bool, "int": int, "float": float, "str": str, "list": list, "dict": dict, "set": set}.get(t, str)


# ---------------------------------------------------------------------------
# argparse and recipes


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags from the dataclass: every field with cli=True becomes --field-name."""
    parser.add_argument("recipe", nargs="?", help="YAML recipe whose keys mirror these flags (flags override it)")
    for f in fields(TrainConfig):
        if not f.metadata.get("cli", True) or f.metadata.get("internal"):
            continue
        kind = _kind(f)
        flag = _flag(f.name)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.metadata.get("repeat"):
            parser.add_argument(flag, action="append", metavar="SPEC", **kw)
            continue
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if kind in (int, float):
            kw["type"] = _int_or_auto if f.metadata.get("auto") else kind
            kw["metavar"] = ("N|auto" if f.metadata.get("auto") else "N") if kind is int else "X"
        elif not f.metadata.get("choices"):
            kw["metavar"] = "VALUE"
        if f.default not in (None, MISSING, "", ()) and kind is not bool:
            kw["help"] += f" (default: {f.default})"
        parser.add_argument(flag, **kw)


def load_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        bundled = Path(__file__).parent / "recipes" / (p.name if p.suffix else p.name + ".yaml")
        if bundled.is_file():
            p = bundled
        else:
            raise ConfigError(f"recipe {path}: no such file; give a YAML file "
                              f"(bundled recipes: {', '.join(bundled_recipes()) or 'none'})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path}: not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)}); "
                          "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: must be a mapping of flag names to values, got a {type(data).__name__}")
    return data


def bundled_recipes() -> list[str]:
    folder = Path(__file__).parent / "recipes"
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe first, then the flags given on the command line, then validation."""
    values = vars(args)
    cfg = TrainConfig()
    recipe = values.get("recipe")
    if recipe:
        cfg.update(load_recipe(recipe), source=f"recipe {recipe}")
    given = {k: v for k, v in values.items() if k in TrainConfig.field_names()}
    cfg.update(given, source="flags")
    return cfg.validate()
