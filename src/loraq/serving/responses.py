"""A request's results as OpenAI's JSON: whole responses, and the chunks of a stream (server-sent events).

A stream sends, per choice, text as it becomes final (:class:`loraq.generation.text.TextDeltas`: never an
incomplete UTF-8 character, never a piece that could grow into a stop string), then a chunk with its
``finish_reason``; with ``stream_options.include_usage`` a last chunk with no choices and the usage; then
``data: [DONE]``. Chat streams open each choice with ``delta.role = "assistant"``.

Log-probabilities are of the model's own distribution at each step (before temperature and top-p), in chat's
shape (``content: [{token, logprob, bytes, top_logprobs}]``) or the legacy completions' (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from loraq.serving.protocol import ApiError, Job


@dataclass
class ChoiceState:
    """One choice while its events arrive: the text given so far and its log-probabilities."""

    deltas: object
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


def usage(job: Job, completion_tokens: int) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _object(job: Job, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.kind == "chat" else "text_completion"
    prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
    return {"id": prefix + job.id, "object": kind, "created": job.created, "model": job.model,
            "system_fingerprint": None}


class Shaper:
    """Turns a job's engine events into OpenAI JSON; ``token_text(id)`` is one token's text."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str], token_text: Callable[[int], str]):
        from loraq.generation.text import TextDeltas

        self.job, self.decode, self.token_text = job, decode, token_text
        self.choices = [ChoiceState(TextDeltas(decode, job.options[k % len(job.options)].stop))
                        for k in range(job.choices)]

    def token(self, index: int, token: int, logprob) -> str:
        state = self.choices[index]
        state.tokens += 1
        if logprob is not None:
            state.logprobs.append(logprob)
        piece = state.deltas.add(token)
        state.text += piece
        return piece

    def done(self, index: int, result) -> str:
        state = self.choices[index]
        text = result.text if result.text is not None else self.decode(result.tokens)
        piece = state.deltas.finish(text)
        state.text, state.tokens, state.finish_reason = text, len(result.tokens), result.finish_reason
        if result.logprobs is not None:
            state.logprobs = result.logprobs[:len(result.tokens)]
        return piece

    def response(self) -> dict:
        """The whole response, once every choice is done."""
        out = _object(self.job, chunk=False)
        out["choices"] = [self._choice(k, s) for k, s in enumerate(self.choices)]
        out["usage"] = usage(self.job, sum(s.tokens for s in self.choices))
        return out

    def _choice(self, index: int, state: ChoiceState) -> dict:
        logprobs = self._logprobs(state.logprobs) if self.job.logprobs is not None else None
        if self.job.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": state.text, "refusal": None},
                    "logprobs": logprobs, "finish_reason": state.finish_reason}
        return {"index": index, "text": state.text, "logprobs": logprobs, "finish_reason": state.finish_reason}

    def _logprobs(self, entries: list) -> dict:
        if self.job.kind == "chat":
            return {"content": [dict(self._entry(t, lp), top_logprobs=[self._entry(a, b) for a, b in top])
                                for t, lp, top in entries], "refusal": None}
        tokens = [self.token_text(t) for t, _, _ in entries]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.token_text(a): b for a, b in top} for _, _, top in entries],
                "text_offset": offsets}

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chunk(self, index: int, piece: str, logprob=None, finish: str | None = None, first: bool = False) -> str:
        out = _object(self.job, chunk=True)
        logprobs = self._logprobs([logprob]) if logprob is not None and self.job.logprobs is not None else None
        if self.job.kind == "chat":
            delta = {"role": "assistant", "content": piece} if first else ({"content": piece} if piece else {})
            out["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        else:
            out["choices"] = [{"index": index, "text": piece, "logprobs": logprobs, "finish_reason": finish}]
        return sse(out)

    def usage_chunk(self) -> str:
        out = _object(self.job, chunk=True)
        out["choices"], out["usage"] = [], usage(self.job, sum(s.tokens for s in self.choices))
        return sse(out)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def collect(shaper: Shaper, events) -> dict:
    """Wait for every choice (``events``: the request's queue) and answer with the whole response."""
    while True:
        event = await events.get()
        kind = event[0]
        if kind == "error":
            raise event[1]
        if kind == "token":
            shaper.token(*event[1:])
        elif kind == "done":
            shaper.done(*event[1:])
        elif kind == "end":
            return shaper.response()


async def stream(shaper: Shaper, events) -> AsyncIterator[str]:
    """The request's server-sent events, as its tokens arrive (see the module docstring)."""
    if shaper.job.kind == "chat":
        for k in range(shaper.job.choices):
            yield shaper.chunk(k, "", first=True)
    while True:
        event = await events.get()
        kind = event[0]
        if kind == "error":
            yield sse(ApiError.body(event[1]))
            break
        if kind == "token":
            _, index, token, logprob = event
            piece = shaper.token(index, token, logprob)
            if piece or logprob is not None:
                yield shaper.chunk(index, piece, logprob)
        elif kind == "done":
            piece = shaper.done(*event[1:])
            yield shaper.chunk(event[1], piece, finish=shaper.choices[event[1]].finish_reason)
        elif kind == "end":
            if shaper.job.include_usage:
                yield shaper.usage_chunk()
            break
    yield sse("[DONE]")
