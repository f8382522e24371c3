"""Evaluation references: prompts with known answers, for exact-match accuracy.

A sample has a reference answer when it is a chat (or sharegpt/alpaca)
conversation ending in an assistant turn (prompt: the messages before it), or
a completion (prompt: the prompt string). The generator starts from
``prompt_ids`` (the chat template with its generation prompt, or the plain
prompt), decodes greedily until a stop token, and :func:`exact_match`
compares the decoded text with ``answer`` after stripping whitespace at both ends.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraq.data.formats import Sample
from loraq.data.prompts import prompt_ids


@dataclass
class EvalReference:
    """A prompt (as ids, and as messages or text) and the answer it should produce."""

    where: str
    prompt_ids: list[int]
    answer: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None


def exact_match(generated: str, answer: str) -> bool:
    """True when the two agree after stripping leading and trailing whitespace."""
    return generated.strip() == answer.strip()


def has_reference(sample: Sample) -> bool:
    if sample.kind == "chat":
        return sample.messages[-1]["role"] == "assistant"
    return sample.kind == "completion"


def eval_references(samples: Sequence[Sample], tokenizer: Any, limit: int) -> list[EvalReference]:
    """The first ``limit`` samples that have a reference answer, in order."""
    references = []
    for sample in samples:
        if len(references) >= limit:
            break
        if not has_reference(sample):
            continue
        if sample.kind == "chat":
            messages = [dict(m) for m in sample.messages[:-1]]
            references.append(EvalReference(sample.where, prompt_ids(tokenizer, messages=messages),
                                            sample.messages[-1]["content"], messages=messages))
        else:
            references.append(EvalReference(sample.where, prompt_ids(tokenizer, prompt=sample.prompt),
                                            sample.completion, prompt=sample.prompt))
    return references


def max_answer_tokens(references: Sequence[EvalReference], tokenizer: Any) -> int:
    """Enough new tokens for the longest answer plus its end-of-turn token (0 without references)."""
    if not references:
        return 0
    lengths = tokenizer([r.answer for r in references], add_special_tokens=False)["input_ids"]
    return max(len(ids) for ids in lengths) + 2
