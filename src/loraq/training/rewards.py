"""Reward functions for GRPO (issue 31): built-in checkers, and the user's own called as TRL calls them.

``--reward SPEC`` (repeatable; ``--reward-weights`` one weight each, default 1):

* ``exact_answer`` or ``exact_answer:COLUMN`` (default column ``answer``): 1.0 when the completion's answer
  equals the record's, else 0.0. The completion's answer is what ``\\boxed{...}`` holds, else what follows the
  last ``####`` or ``answer:``, else -- when the expected answer is a number -- its last number, else the
  whole text; compared as numbers when both are (to 1e-6 relative), else as text with case, surrounding
  spaces and a final period ignored.
* ``regex:PATTERN``: 1.0 when the whole completion matches ``PATTERN`` (``re.fullmatch``, ``re.DOTALL``).
* ``length:N``: ``max(0, 1 - |n - N| / N)`` for a completion of ``n`` tokens.
* ``json`` or ``json:SCHEMA.json``: 1.0 when the completion (stripped, a ```json fence removed) parses as JSON
  -- and validates against the schema file, through the optional ``jsonschema`` package -- else 0.0.
* ``path/to/file.py:function``: the user's function, called with keyword arguments as TRL 1.16 calls reward
  functions: ``prompts``, ``completions`` (texts, or ``[{"role": "assistant", "content": text}]`` lists when
  the prompts are conversations), ``completion_ids`` (lists of ids), and every other column of the records
  as a list with one value per completion. It returns one float (or None: not scored) per completion.

Built-ins have the same signature, so the trainer calls every reward the same way (:func:`score`).
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraq.errors import ConfigError, LoraqError

RewardFunction = Callable[..., list]
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Reward:
    """A reward function and its name (metrics: ``rewards/<name>/mean``)."""

    name: str
    function: RewardFunction


def load_rewards(specs: Sequence[str]) -> list[Reward]:
    """One :class:`Reward` per ``--reward`` spec (see the module docstring); a ConfigError names a bad one."""
    if not specs:
        raise ConfigError("--objective grpo needs at least one --reward (e.g. --reward exact_answer, "
                          "--reward regex:'^Answer: .*', --reward my_rewards.py:score)")
    return [_load(spec) for spec in specs]


def _load(spec: str) -> Reward:
    head, sep, arg = spec.partition(":")
    if head.endswith(".py"):
        return Reward(arg or head, _user_function(Path(head), arg, spec))
    builders = {"exact_answer": _exact_answer, "regex": _regex, "length": _length, "json": _json}
    if head not in builders:
        raise ConfigError(f"--reward {spec!r}: not a built-in ({', '.join(builders)}) nor path/to/file.py:function")
    return Reward(head, builders[head](arg if sep else None, spec))


def _user_function(path: Path, name: str, spec: str) -> RewardFunction:
    if not name:
        raise ConfigError(f"--reward {spec!r}: name the function, as {path}:function")
    if not path.is_file():
        raise ConfigError(f"--reward {spec!r}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"loraq_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # the user's own file: running it is what they asked for
    except Exception as exc:
        raise ConfigError(f"--reward {spec!r}: {path} failed to import ({type(exc).__name__}: {exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"--reward {spec!r}: {path} has no function {name!r}")
    return function


class RewardError(LoraqError):
    """A reward function raised, or returned something that is not one number (or None) per completion."""


def score(rewards: Sequence[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list], where: Sequence[str] | None = None) -> list[list[float]]:
    """``[completion][reward]`` floats (NaN where a function returned None), each reward called once for all.
    A function that raises is called again one completion at a time to name the prompt it fails on
    (``where[i]``: completion ``i``'s record) in the :class:`RewardError`."""
    table = []
    for reward in rewards:
        try:
            values = reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                     **columns)
        except Exception as exc:  # the user's code: any exception is theirs to fix
            raise _failure(reward, exc, prompts, completions, completion_ids, columns, where) from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise RewardError(f"reward {reward.name!r} returned {type(values).__name__} of "
                              f"{len(values) if hasattr(values, '__len__') else '?'} values for {len(completions)} "
                              "completions; it must return one float (or None) per completion")
        table.append([_number_or_nan(v, reward, i, prompts, where) for i, v in enumerate(values)])
    return [list(row) for row in zip(*table)]


def _number_or_nan(value: Any, reward: Reward, i: int, prompts: list, where: Sequence[str] | None) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise RewardError(f"reward {reward.name!r} returned {value!r} ({type(value).__name__}) for the prompt "
                          f"{_describe(prompts[i], where, i)}; return a float (or None) per completion")
    return float(value)


def _failure(reward: Reward, exc: Exception, prompts: list, completions: list, completion_ids: list,
             columns: dict[str, list], where: Sequence[str] | None) -> RewardError:
    """The error naming the first completion the function fails on alone (or the batch, if none does)."""
    for i in range(len(completions)):
        try:
            reward.function(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                            completion_ids=completion_ids[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as alone:
            return RewardError(f"reward {reward.name!r} raised {type(alone).__name__}: {alone} on the prompt "
                               f"{_describe(prompts[i], where, i)}; fix the function (or the record)")
    return RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc} (on the batch of "
                       f"{len(completions)} completions, none alone); fix the function")


def _describe(prompt: Any, where: Sequence[str] | None, i: int) -> str:
    text = completion_text(prompt) if isinstance(prompt, list) else str(prompt)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text!r}" + (f" ({where[i]})" if where is not None else "")


def completion_text(completion: Any) -> str:
    """The text of a completion: itself, or the content of its last message (conversations)."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


# -- built-ins ----------------------------------------------------------------------------------------------
def _exact_answer(column: str | None, spec: str) -> RewardFunction:
    column = column or "answer"

    def exact_answer(completions, **columns):
        if column not in columns:
            raise ConfigError(f"--reward {spec!r}: the records have no {column!r} column "
                              f"(they have: {', '.join(sorted(columns)) or 'none'})")
        return [float(answers_match(completion_text(c), str(a))) for c, a in zip(completions, columns[column])]

    return exact_answer


def answers_match(text: str, expected: str) -> bool:
    """Whether ``text``'s answer equals ``expected`` (see the module docstring for what "answer" means)."""
    found = _answer_of(text, expected)
    a, b = _number(found), _number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return _plain(found) == _plain(expected)


def _answer_of(text: str, expected: str) -> str:
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1]
    marked = re.split(r"####|(?i:answer:)", text)
    if len(marked) > 1:
        tail = marked[-1].strip()
        return tail.splitlines()[0] if tail else ""
    if _number(expected) is not None:
        numbers = NUMBER.findall(text)
        return numbers[-1] if numbers else text
    return text


def _number(text: str) -> float | None:
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _plain(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def _regex(pattern: str | None, spec: str) -> RewardFunction:
    if not pattern:
        raise ConfigError(f"--reward {spec!r}: give the pattern, as regex:PATTERN")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"--reward {spec!r}: not a valid regular expression ({exc})") from None

    def regex(completions, **_):
        return [float(compiled.fullmatch(completion_text(c)) is not None) for c in completions]

    return regex


def _length(target: str | None, spec: str) -> RewardFunction:
    try:
        n = int(target or "")
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--reward {spec!r}: give the target length in tokens, as length:N (N >= 1)")

    def length(completion_ids, **_):
        return [max(0.0, 1.0 - abs(len(ids) - n) / n) for ids in completion_ids]

    return length


def _json(schema_path: str | None, spec: str) -> RewardFunction:
    validate = _schema_validator(Path(schema_path), spec) if schema_path else None

    def json_valid(completions, **_):
        out = []
        for c in completions:
            text = re.sub(r"^```(?:json)?\s*|\s*```$", "", completion_text(c).strip())
            try:
                value = json.loads(text)
            except ValueError:
                out.append(0.0)
                continue
            out.append(float(validate is None or validate(value)))
        return out

    return json_valid


def _schema_validator(path: Path, spec: str) -> Callable[[Any], bool]:
    try:
        import jsonschema
    except ImportError:
        raise ConfigError(f"--reward {spec!r}: checking a JSON schema needs the jsonschema package "
                          "(pip install jsonschema); --reward json alone checks that the JSON parses") from None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        validator = jsonschema.validators.validator_for(schema)(schema)
    except (OSError, ValueError, jsonschema.exceptions.SchemaError) as exc:
        raise ConfigError(f"--reward {spec!r}: {path} is not a readable JSON schema ({exc})") from None
    return validator.is_valid
