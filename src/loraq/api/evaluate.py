"""``loraq eval`` as a function: loss, perplexity and exact match of a model (+ adapter) on a dataset; on
preference pairs, preference accuracy (and, with an adapter, DPO's reward accuracy against its base)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraq.errors import ConfigError

DEFAULTS = {"format": "auto", "seq_len": 2048, "train_on_inputs": False, "beta": 0.1}


def evaluate(data: str | Path, *, model: str | None = None, adapter: str | Path | None = None,
             format: str | None = None, seq_len: int | None = None, train_on_inputs: bool | None = None,
             batch_size: int = 8, max_examples: int = 200, dtype: str = "auto", quant: str = "auto",
             ignore_base_fingerprint: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score ``data``; returns ``{loss, perplexity, exact_match, tokens, examples, ...}``.

    With an adapter that is a loraq run folder, the data settings a user did not
    give (``format``, ``seq_len``, ``train_on_inputs``: which tokens are scored)
    are the run's own, so the loss is comparable with the run's ``eval_loss``;
    the base is the one the adapter was trained on (:mod:`loraq.lora.adapted`).
    """
    from loraq.api.data import is_preference_file
    from loraq.api.loading import load_for_inference
    from loraq.training.evaluate import evaluate_dataset

    settings = data_settings(adapter, {"format": format, "seq_len": seq_len, "train_on_inputs": train_on_inputs,
                                       "beta": None})
    for flag, value, lo in (("--seq-len", settings["seq_len"], 8), ("--batch-size", batch_size, 1),
                            ("--max-examples", max_examples, 0)):
        if value < lo:
            raise ConfigError(f"{flag} must be at least {lo} (got {value})")
    loaded = load_for_inference(model, None if adapter is None else str(adapter), dtype=dtype, quant=quant,
                                ignore_base_fingerprint=ignore_base_fingerprint, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, say=say)
    if is_preference_file(data, settings["format"]):
        from loraq.training.preference_eval import evaluate_pairs

        result = evaluate_pairs(loaded.model, loaded.tokenizer, str(data), fmt=settings["format"],
                                seq_len=settings["seq_len"], batch_size=batch_size, beta=settings["beta"])
    else:
        result = evaluate_dataset(loaded.model, loaded.tokenizer, str(data), fmt=settings["format"],
                                  seq_len=settings["seq_len"], batch_size=batch_size, max_examples=max_examples,
                                  train_on_inputs=settings["train_on_inputs"])
    return {**result, "model": loaded.source.name, "adapter": None if adapter is None else str(adapter),
            "seq_len": settings["seq_len"], "train_on_inputs": settings["train_on_inputs"]}


def data_settings(adapter: str | Path | None, given: dict[str, Any]) -> dict[str, Any]:
    """Each setting: as given, else the training run's (``run.json`` beside the adapter), else the default."""
    run: dict[str, Any] = {}
    run_file = Path(adapter) / "run.json" if adapter is not None else None
    if run_file is not None and run_file.is_file():
        try:
            run = json.loads(run_file.read_text(encoding="utf-8")).get("config", {})
        except (OSError, ValueError, AttributeError):
            run = {}
    return {key: given[key] if given.get(key) is not None else run.get(key, default)
            for key, default in DEFAULTS.items()}
