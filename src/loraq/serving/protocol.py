"""OpenAI's request and response shapes: a request's JSON body -> a :class:`Job` (checked), results -> JSON.

The fields follow OpenAI's API reference for ``/v1/chat/completions`` and ``/v1/completions`` (and vLLM's for
what OpenAI lacks). A field out of range is an :class:`ApiError` with status 400 naming the field
(``param``), in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``; an unknown model is a
404 (``model_not_found``); a prompt that leaves no room in the context a 400 (``context_length_exceeded``).

Defaults are OpenAI's: ``temperature`` 1, ``top_p`` 1, ``n`` 1; ``max_tokens`` (or ``max_completion_tokens``):
what is left of the context, at most ``DEFAULT_MAX_TOKENS``. Choice ``j`` of a request with ``seed`` s
samples with seed ``s + j`` (so ``n`` choices differ and each reproduces). vLLM's ``ignore_eos``: the model's
stop tokens end nothing (benchmarks ask for exactly ``max_tokens``). loraq's extension: ``"adapters":
[{"name": ..., "scale": ...}]`` with ``model`` = the base mixes adapters for the request (each row's update
is the weighted sum, :mod:`loraq.lora.rows`).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from loraq.generation.sampling import Sampling

DEFAULT_MAX_TOKENS = 1024
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs; completions' logprobs goes to 5
MAX_MIX = 8


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Context:
    """What parsing needs of the server: its tokenizer, context length, base name, limits, adapter lookup."""

    tokenizer: Any
    context_length: int
    base_name: str
    max_n: int
    is_adapter: Any  # name -> bool


@dataclass
class Job:
    """One request: its prompts (token ids), ``n`` choices each, the options of every choice, its route."""

    kind: str  # "chat" or "completion"
    model: str
    prompts: list[list[int]]
    options: list[Sampling]  # one per choice of a prompt (choice j: seed + j)
    route: tuple  # public (adapter name, weight) pairs; () = the base
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: the model's stop tokens end nothing
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def choices(self) -> int:
        return len(self.prompts) * len(self.options)


def parse_chat(body: Any, ctx: Context) -> Job:
    """A ``/v1/chat/completions`` body as a :class:`Job`."""
    from loraq.generation.text import build_prompt_ids

    body = _object(body)
    route = _route(body.get("model"), body.get("adapters"), ctx)  # an unknown model first: 404 whatever else
    messages = _messages(body.get("messages"))
    try:
        ids = build_prompt_ids(ctx.tokenizer, messages)[0].tolist()
    except Exception as exc:  # the chat template's own complaint (roles out of order, ...)
        raise ApiError(400, f"the messages cannot be rendered with the model's chat template: {exc}",
                       param="messages") from None
    top = None
    if _bool(body, "logprobs", False):
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return _job("chat", body, ctx, [ids], top, route)


def parse_completion(body: Any, ctx: Context) -> Job:
    """A ``/v1/completions`` body as a :class:`Job` (a prompt: text, texts, token ids, or lists of them)."""
    body = _object(body)
    route = _route(body.get("model"), body.get("adapters"), ctx)
    best_of = body.get("best_of")
    unsupported = {"echo": body.get("echo") not in (None, False), "suffix": body.get("suffix") not in (None, ""),
                   "best_of": best_of is not None and (isinstance(best_of, bool) or best_of != 1)}
    for name, asked in unsupported.items():
        if asked:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    prompts = _prompts(body.get("prompt"), ctx.tokenizer)
    top = body.get("logprobs")
    top = None if top is None else _int(body, "logprobs", 0, 0, 5)
    return _job("completion", body, ctx, prompts, top, route)


def _job(kind: str, body: dict, ctx: Context, prompts: list[list[int]], top: int | None, route: tuple) -> Job:
    model = body["model"]
    n = _int(body, "n", 1, 1, ctx.max_n)
    longest = max(len(p) for p in prompts)
    max_tokens = _max_tokens(body, ctx.context_length - longest)
    if longest + max_tokens > ctx.context_length:
        raise ApiError(400, f"This model's maximum context length is {ctx.context_length} tokens. However, you "
                       f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the "
                       "completion). Please reduce the length of the prompt or completion.",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", param="seed")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise ApiError(400, "top_p must be greater than 0", param="top_p")
    stop = _stops(body.get("stop"))
    options = [Sampling(max_tokens, temperature, top_p, 0, None if seed is None else seed + j, stop)
               for j in range(n)]
    stream = _bool(body, "stream", False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return Job(kind, model, prompts, options, route, top, stream, bool(stream_options.get("include_usage")),
               _bool(body, "ignore_eos", False))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{k}] needs a role: system, developer, user or assistant",
                           param=f"messages[{k}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{k}].content: only text parts are supported",
                               param=f"messages[{k}].content")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{k}].content must be a string", param=f"messages[{k}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    from loraq.data.prompts import prompt_ids

    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
    out = []
    vocab = len(tokenizer)
    for p in prompt:
        if isinstance(p, str):
            out.append(prompt_ids(tokenizer, prompt=p))
        elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < vocab for t in p):
            out.append(list(p))
        else:
            raise ApiError(400, f"prompt: each prompt is a string or a non-empty list of token ids below {vocab}",
                           param="prompt")
        if not out[-1]:
            raise ApiError(400, "prompt is empty", param="prompt")
    return out


def _route(model: Any, mix: Any, ctx: Context) -> tuple:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: the base's name or an adapter's (GET /v1/models)", param="model")
    if model != ctx.base_name and not ctx.is_adapter(model):
        raise ApiError(404, f"The model '{model}' does not exist: this server has the base {ctx.base_name!r} and "
                       "the adapters GET /v1/models lists", param="model", code="model_not_found")
    if mix is None:
        return () if model == ctx.base_name else ((model, 1.0),)
    if model != ctx.base_name:
        raise ApiError(400, "adapters (a mix) needs model = the base's name", param="adapters")
    if not isinstance(mix, list) or not 0 < len(mix) <= MAX_MIX:
        raise ApiError(400, f"adapters must be a list of 1 to {MAX_MIX} {{name, scale}}", param="adapters")
    route = []
    for k, item in enumerate(mix):
        name = item.get("name") if isinstance(item, dict) else None
        scale = item.get("scale", 1.0) if isinstance(item, dict) else None
        if not isinstance(name, str) or not ctx.is_adapter(name):
            raise ApiError(404, f"adapters[{k}]: no adapter named {name!r} (GET /v1/models)",
                           param=f"adapters[{k}].name", code="model_not_found")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ApiError(400, f"adapters[{k}].scale must be a number", param=f"adapters[{k}].scale")
        route.append((name, float(scale)))
    return tuple(route)


def _max_tokens(body: dict, room: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return _int(body, key, None, 1, None)
    if room < 1:
        return 1  # the context check that follows names the problem
    return min(room, DEFAULT_MAX_TOKENS)


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings (got {len(stop)})", param="stop")
    return tuple(s for s in stop if s)


def _int(body: dict, key: str, default: int | None, low: int | None, high: int | None) -> int:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"{key} must be {span} (got {value})", param=key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a number", param=key)
    if not low <= value <= high:
        raise ApiError(400, f"{key} must be between {low:g} and {high:g} (got {value})", param=key)
    return float(value)


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", param=key)
    return value
