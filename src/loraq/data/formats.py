"""Dataset formats: which one a file is in, and one internal form for all of them.

Formats (the keys a record must hold):

* ``chat``: ``messages``, a list of ``{"role", "content"}`` (OpenAI style;
  roles system, user, assistant, tool; any number of turns).
* ``sharegpt``: ``conversations``, a list of ``{"from", "value"}`` (from
  human/user, gpt/assistant/model, system, tool).
* ``alpaca``: ``instruction``, optional ``input``, ``output`` (optional ``system``).
* ``completion``: ``prompt`` and ``completion`` (plain text, no chat template).
* ``text``: ``text`` (plain text, every token trained).

Everything becomes a :class:`Sample`: ``chat``, ``sharegpt`` and ``alpaca``
become a list of ``{"role", "content"}`` messages (kind ``"chat"``);
``completion`` and ``text`` keep their strings. Extra keys in a record are
ignored; a missing or ill-typed field, an unknown role, empty content or a
conversation without an assistant turn is a one-line DataError naming
``file:line``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loraq.choices import DATA_FORMATS
from loraq.data.readers import Record
from loraq.errors import DataError

CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "tool": "tool", "function": "tool", "observation": "tool"}
_HINT = ("messages (chat), conversations (sharegpt), instruction+output (alpaca), "
         "prompt+completion (completion), text (text) or prompt+chosen+rejected (preference)")


@dataclass(frozen=True)
class Sample:
    """One example in loraq's internal form.

    ``kind`` is ``"chat"`` (``messages``: list of {"role", "content"} dicts),
    ``"completion"`` (``prompt`` + ``completion``) or ``"text"`` (``text``).
    ``where`` is the ``file:line`` it came from.
    """

    kind: str
    where: str
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""


def guess_format(data: dict[str, Any]) -> str | None:
    """The format a record's keys say it is in, or None when they fit none."""
    if "chosen" in data or "rejected" in data:
        return "preference"  # read by loraq.data.preference
    if "messages" in data:
        return "chat"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "completion"
    if "text" in data:
        return "text"
    return None


def detect_format(records: Sequence[Record]) -> str:
    """The format of the first record, checked against all others.

    DataError naming the first record that fits no format or a different one.
    """
    first = records[0]
    fmt = _format_of_first(first)
    for record in records[1:]:
        _check_same_format(record, fmt, first)
    return fmt


def _format_of_first(first: Record) -> str:
    fmt = guess_format(first.data)
    if fmt is None:
        raise DataError(f"{first.where}: cannot tell the format from the fields {_keys(first.data)}; "
                        f"expected {_HINT}, or pass --format")
    return fmt


def _check_same_format(record: Record, fmt: str, first: Record) -> None:
    other = guess_format(record.data)
    if other != fmt:
        looks = f"looks like {other}" if other else f"fits no format (fields {_keys(record.data)})"
        raise DataError(f"{record.where}: this record {looks} but the first record ({first.where}) is {fmt}; "
                        f"make every record the same format or pass --format")


def to_samples(records: Sequence[Record], fmt: str = "auto",
               skipped: list[str] | None = None) -> tuple[str, list[Sample]]:
    """(format, samples): the format detected (``fmt="auto"``) or given, and every record converted.

    With a ``skipped`` list, records that do not fit (another format, bad
    fields) are left out and their messages appended; without it the first
    one raises (the same error :func:`detect_format` gives).
    """
    auto = fmt in (None, "auto")
    if auto:
        # when skipping, the format is that of the first record that has one
        first = next((r for r in records if guess_format(r.data)), records[0]) if skipped is not None else records[0]
        fmt = _format_of_first(first)
    elif fmt not in DATA_FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of: auto, {', '.join(DATA_FORMATS)}")
    samples = []
    for record in records:
        try:
            if auto:
                _check_same_format(record, fmt, first)
            samples.append(to_sample(record, fmt))
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
    if not samples:
        raise DataError(f"{records[0].where}: no record is usable as {fmt} (first problem: {skipped[0]}); fix the data")
    return fmt, samples


def to_sample(record: Record, fmt: str) -> Sample:
    """Convert and validate one record of format ``fmt``."""
    data, where = record.data, record.where
    if fmt == "chat":
        raw = _field(data, "messages", where, fmt, list)
        messages = [_chat_message(m, i, where) for i, m in enumerate(raw, start=1)]
        return _chat_sample(messages, "messages", where)
    if fmt == "sharegpt":
        raw = _field(data, "conversations", where, fmt, list)
        messages = [_sharegpt_message(m, i, where) for i, m in enumerate(raw, start=1)]
        return _chat_sample(messages, "conversations", where)
    if fmt == "alpaca":
        instruction = _text_field(data, "instruction", where, fmt)
        extra = _text_field(data, "input", where, fmt, required=False, allow_empty=True)
        output = _text_field(data, "output", where, fmt)
        system = _text_field(data, "system", where, fmt, required=False, allow_empty=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = ([{"role": "system", "content": system}] if system.strip() else [])
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Sample("chat", where, messages=messages)
    if fmt == "completion":
        prompt = _text_field(data, "prompt", where, fmt, allow_empty=True)
        completion = _text_field(data, "completion", where, fmt)
        return Sample("completion", where, prompt=prompt, completion=completion)
    if fmt == "text":
        return Sample("text", where, text=_text_field(data, "text", where, fmt))
    if fmt == "preference":
        raise DataError(f"{where}: a preference pair (prompt/chosen/rejected) trains with --objective dpo or orpo; "
                        f"pass one of them, or give supervised data")
    raise DataError(f"unknown data format {fmt!r}; choose one of: auto, {', '.join(DATA_FORMATS)}")


def _keys(data: dict[str, Any]) -> str:
    names = list(data)[:8]
    return "{" + ", ".join(str(k) for k in names) + (", ..." if len(data) > 8 else "") + "}"


def _field(data: dict[str, Any], key: str, where: str, fmt: str, kind: type) -> Any:
    if key not in data:
        raise DataError(f"{where}: missing field '{key}' for format {fmt}; records hold {_keys(data)}")
    value = data[key]
    if kind is list and isinstance(value, str) and value.lstrip().startswith("["):
        try:  # a CSV cell holding a JSON list
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field '{key}' holds malformed JSON; write it as a JSON list") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        want = "a list" if kind is list else "a string"
        raise DataError(f"{where}: field '{key}' must be {want}, got {_kind(value)}")
    return value


def _text_field(data: dict[str, Any], key: str, where: str, fmt: str, required: bool = True,
                allow_empty: bool = False) -> str:
    if key not in data or data[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}' for format {fmt}; records hold {_keys(data)}")
        return ""
    value = _field(data, key, where, fmt, str)
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; fill it in or remove the record")
    return value


def _kind(value: Any) -> str:
    names = {list: "a list", dict: "an object", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _content(value: Any, what: str, where: str) -> str:
    """Message content: a string, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(f"{where}: {what} has a content part that is not text; only text is supported")
            texts.append(part["text"])
        value = "".join(texts)
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} content must be a string, got {_kind(value)}")
    if not value.strip():
        raise DataError(f"{where}: {what} has empty content; fill it in or remove the message")
    return value


def _chat_message(message: Any, index: int, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {index} must be an object with role and content, got {_kind(message)}")
    for key in ("role", "content"):
        if key not in message:
            raise DataError(f"{where}: message {index} has no '{key}'; each message needs role and content")
    role = message["role"]
    if role not in CHAT_ROLES:
        raise DataError(f"{where}: message {index} has unknown role {role!r}; use one of: {', '.join(CHAT_ROLES)}")
    return {"role": role, "content": _content(message["content"], f"message {index} ({role})", where)}


def _sharegpt_message(message: Any, index: int, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DataError(f"{where}: turn {index} must be an object with from and value, got {_kind(message)}")
    role_key, text_key = ("from", "value") if "from" in message or "value" in message else ("role", "content")
    for key in (role_key, text_key):
        if key not in message:
            raise DataError(f"{where}: turn {index} has no '{key}'; each turn needs from and value")
    speaker = message[role_key]
    role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise DataError(f"{where}: turn {index} has unknown speaker {speaker!r}; use one of: "
                        f"{', '.join(SHAREGPT_ROLES)}")
    return {"role": role, "content": _content(message[text_key], f"turn {index} ({speaker})", where)}


def _chat_sample(messages: list[dict[str, str]], key: str, where: str) -> Sample:
    if not messages:
        raise DataError(f"{where}: '{key}' is empty; give at least a user and an assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so there is nothing to train on; add the assistant's answer")
    return Sample("chat", where, messages=messages)
