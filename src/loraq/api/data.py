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
    bundle = build_data(cfg, tokenizer, skip_bad=skip_bad_examples)
    shown = [{"where": e.where, "tokens": len(e), "trained": e.num_trained, "text": marked_text(tokenizer, e)}
             for e in bundle.train_examples[:show]]
    return {**summarize(bundle, given_format=format != "auto"), "examples_shown": shown}


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
