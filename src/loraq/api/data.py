"""``loraq data`` as a function: how loraq reads a dataset, before any training.

The report: the format (detected or given), records and examples, token
statistics with the share of tokens that carry loss, how many examples
``seq_len`` truncates or drops, the padding share with and without packing,
``show`` examples rendered as the model sees them, with the trained
tokens between ``[[`` and ``]]``, and the token store it read (or wrote).
It goes through the same ``build_data`` as training, so what it accepts,
training accepts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loraq.data.dataset import DataBundle
from loraq.data.tokenize import Example
from loraq.errors import ConfigError

OPEN, CLOSE = "[[", "]]"


def inspect_data(file: str | Path, *, data_split: str | None = None, data_config: str | None = None,
                 format: str = "auto", model: str | None = None, seq_len: int = 512,
                 batch_size: int = 4, packing: bool = False, train_on_inputs: bool = False,
                 skip_bad_examples: bool = False, show: int = 1) -> dict[str, Any]:
    """The report (see the module docstring), with ``examples_shown``: ``show`` rendered examples."""
    from loraq.config import TrainConfig
    from loraq.data.dataset import build_data
    from loraq.models.load import load_tokenizer

    if show < 0:
        raise ConfigError(f"--show {show} must be 0 or more")
    cfg = TrainConfig.from_dict({"data": str(file), "data_split": data_split, "data_config": data_config,
                                 "format": format, "seq_len": seq_len, "batch_size": batch_size,
                                 "packing": packing, "train_on_inputs": train_on_inputs, "eval_samples": 0},
                                source="flags").validate()
    tokenizer = load_tokenizer(model)
    if is_preference_file(file, format, data_split, data_config):
        return inspect_pairs(cfg, tokenizer, skip_bad_examples, show, given_format=format != "auto")
    bundle = build_data(cfg, tokenizer, skip_bad=skip_bad_examples)
    shown = [{"where": e.where, "tokens": len(e), "trained": e.num_trained, "text": marked_text(tokenizer, e)}
             for e in bundle.train_examples[:show]]
    return {**summarize(bundle, given_format=format != "auto"), "examples_shown": shown}


def is_preference_file(file: str | Path, format: str, data_split: str | None = None,
                       data_config: str | None = None) -> bool:
    """``--format preference``, or detected: the first record has chosen/rejected fields."""
    from loraq.data.formats import guess_format
    from loraq.data.sources import first_record

    if format != "auto":
        return format == "preference"
    first = first_record(file, split=data_split, config=data_config)
    return first is not None and guess_format(first.data) == "preference"


def inspect_pairs(cfg, tokenizer: Any, skip_bad: bool, show: int, given_format: bool) -> dict[str, Any]:
    """The report for preference pairs: prompt and answer token counts, truncation (prompt kept, answers cut),
    and ``show`` pairs rendered with each answer's scored tokens between [[ and ]]."""
    from loraq.data.preference import build_preference_data

    bundle = build_preference_data(cfg, tokenizer, skip_bad=skip_bad)
    st, pairs = bundle.stats, bundle.train
    shown = [{"where": p.where, "tokens": len(p.chosen), "trained": p.chosen.num_trained,
              "prompt_tokens": p.prompt_tokens, "chosen_tokens": p.chosen.num_trained,
              "rejected_tokens": p.rejected.num_trained, "text": marked_text(tokenizer, p.chosen),
              "rejected_text": marked_text(tokenizer, p.rejected)} for p in pairs[:show]]
    lengths = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    return {"file": st.path, "format": st.format, "format_source": "given" if given_format else "detected",
            "records": st.train.records, "skipped": st.skipped, "skipped_first": st.skipped_messages[:3],
            "examples": st.train.examples, "pairs": len(pairs), "truncated": st.train.truncated, "dropped": 0,
            "seq_len": st.seq_len, "tokens": st.train.tokens, "trained_tokens": st.train.trained_tokens,
            "trained_share": st.train.trained_tokens / st.train.tokens if st.train.tokens else 0.0,
            "tokens_per_example": _spread(lengths),
            "prompt_tokens": _spread([p.prompt_tokens for p in pairs]),
            "chosen_tokens": _spread([p.chosen.num_trained for p in pairs]),
            "rejected_tokens": _spread([p.rejected.num_trained for p in pairs]),
            "padding_fraction": 0.0, "padding_fraction_packed": 0.0, "packed_rows": 0, "examples_shown": shown}


def _spread(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def summarize(bundle: DataBundle, given_format: bool) -> dict[str, Any]:
    st = bundle.stats
    lengths = bundle.train_examples.lengths
    return {
        "file": st.path, "format": st.format, "format_source": "given" if given_format else "detected",
        "records": st.train.records, "skipped": st.skipped, "skipped_first": st.skipped_messages[:3],
        "examples": st.train.examples, "truncated": st.train.truncated, "dropped": st.train.dropped,
        "seq_len": st.seq_len, "tokens": st.train.tokens, "trained_tokens": st.train.trained_tokens,
        "trained_share": st.train.trained_tokens / st.train.tokens if st.train.tokens else 0.0,
        "tokens_per_example": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "padding_fraction": st.train.padding_fraction, "padding_fraction_packed": st.train.padding_fraction_packed,
        "packed_rows": st.train.packed_rows, "token_store": bundle.store_paths[0],
    }


def marked_text(tokenizer: Any, example: Example) -> str:
    """The example's text with each run of trained tokens between [[ and ]]."""
    pieces, run, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        is_trained = label != -100
        if trained is not None and is_trained != trained:
            pieces.append(_piece(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        pieces.append(_piece(tokenizer, run, bool(trained)))
    return "".join(pieces)


def _piece(tokenizer: Any, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids)
    return f"{OPEN}{text}{CLOSE}" if trained else text
