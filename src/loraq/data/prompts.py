"""What a generator starts from and where it stops: one rule for training-time evaluation and for generation.

* :func:`prompt_ids`: chat messages rendered with the tokenizer's chat template
  (ChatML when it has none, as training renders them) plus the generation
  prompt, tokenized without added special tokens (the template writes its own);
  a plain prompt (a completion prompt, or ``--no-chat-template``) tokenized
  with the tokenizer's own special tokens.
* :func:`stop_token_ids`: EOS, the template's end-of-turn token (when it is
  one token), and the model's ``generation_config.eos_token_id`` entries.
* :func:`pad_token_id`: the tokenizer's pad token, else EOS, else the first
  stop token, else 0.

Exact match during training (:mod:`loraq.training.evaluate`), ``loraq eval``,
``loraq generate`` and ``loraq chat`` all use these.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraq.data.tokenize import chat_spans, render_chat
from loraq.errors import DataError


def prompt_ids(tokenizer: Any, messages: Sequence[dict] | None = None, prompt: str | None = None) -> list[int]:
    """Token ids a generator starts from: chat messages + the generation prompt, or a plain prompt."""
    if messages is not None:
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt or "", add_special_tokens=True)["input_ids"])


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Ids that end an answer (see the module docstring), without repeats, EOS first."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    try:
        text, spans = chat_spans(tokenizer, probe)
    except DataError:
        text, spans = "", []
    if spans:
        start, end = spans[0]
        marker = text[start + 1:end].strip()
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        if len(marker_ids) == 1:
            ids.append(int(marker_ids[0]))
    configured = getattr(generation_config, "eos_token_id", None)
    ids += [int(t) for t in (configured if isinstance(configured, (list, tuple)) else [configured])
            if isinstance(t, int)]
    return list(dict.fromkeys(ids))


def pad_token_id(tokenizer: Any, stops: Sequence[int] = ()) -> int:
    """The id that fills padding positions (see the module docstring)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *stops):
        if candidate is not None:
            return int(candidate)
    return 0
