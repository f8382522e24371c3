"""Prompts in, text out: the engine (:mod:`loraq.generation.engine`) behind ``loraq generate`` and ``chat``.

``generate_text(model, tokenizer, prompt)`` renders a single user turn with the chat template as training
renders it (:mod:`loraq.data.prompts`; the raw prompt with ``chat_template=False``; a list of messages for a
whole conversation), decodes with :class:`~loraq.generation.sampling.Sampling`'s rules and returns the new
text. It stops at the same tokens as exact match during training (end-of-turn, end-of-sequence, the
generation config's) and at the caller's stop strings, which are cut from the text.

With ``stream`` (a text file) each piece is written and flushed as soon as it is final: text decoded so far,
less an incomplete UTF-8 character at its end and less any end that could still grow into a stop string;
the stream ends with a newline.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

import torch

from loraq.generation.engine import StopText, generate_ids
from loraq.generation.sampling import Sampling


def build_prompt_ids(tokenizer: Any, prompt: str | list[dict], chat_template: bool = True) -> torch.Tensor:
    """Token ids [1, n] of ``prompt``: one user turn (or a whole conversation) rendered as training renders it
    (:func:`loraq.data.prompts.prompt_ids`), or the raw text without ``chat_template``."""
    from loraq.data.prompts import prompt_ids

    if isinstance(prompt, list):
        ids = prompt_ids(tokenizer, messages=prompt)
    elif chat_template:
        ids = prompt_ids(tokenizer, messages=[{"role": "user", "content": prompt}])
    else:
        ids = prompt_ids(tokenizer, prompt=prompt)
    return torch.tensor([ids], dtype=torch.long)


def generate_text(model: Any, tokenizer: Any, prompt: str | list[dict], *, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  stop: Sequence[str] = (), chat_template: bool = True, stream: TextIO | None = None) -> str:
    """Generate a reply to ``prompt``; see the module docstring for the rules."""
    from loraq.data.prompts import pad_token_id, stop_token_ids

    options = Sampling(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))
    ids = build_prompt_ids(tokenizer, prompt, chat_template)[0].tolist()
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    decode = text_decoder(tokenizer)
    writer = TextStream(decode, options.stop, stream) if stream is not None else None
    (result,) = generate_ids(model, [ids], options, stop_ids=stops, pad_id=pad_token_id(tokenizer, stops),
                             stop_text=[StopText(decode, options.stop)],
                             on_token=writer.add if writer is not None else None)
    text = result.text if result.text is not None else decode(result.tokens)
    if writer is not None:
        writer.finish(text)
    return text


def text_decoder(tokenizer: Any):
    """ids -> the text a reply shows (special tokens left out): the one decoding rule of generate, chat and serve."""
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)


class TextDeltas:
    """A row's text as it becomes final (see the module docstring): :meth:`add` a token, get the new piece."""

    def __init__(self, decode, stops: Sequence[str]):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.tokens: list[int] = []
        self.written = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        final = len(text.rstrip("\ufffd")) - self._held(text)
        if final <= self.written:
            return ""
        piece, self.written = text[self.written:final], final
        return piece

    def _held(self, text: str) -> int:
        """How many characters at the end could still be the start of a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def finish(self, text: str) -> str:
        """What is left of the row's whole ``text`` (cut before a stop string) after the pieces given."""
        piece, self.written = text[self.written:], len(text)
        return piece


class TextStream:
    """Writes a row's text to ``out`` as it becomes final, and a newline at the end."""

    def __init__(self, decode, stops: Sequence[str], out: TextIO):
        self.deltas, self.out = TextDeltas(decode, stops), out

    def add(self, row: int, token: int) -> None:
        self._write(self.deltas.add(token))

    def finish(self, text: str) -> None:
        self._write(self.deltas.finish(text) + "\n")

    def _write(self, piece: str) -> None:
        if piece:
            self.out.write(piece)
            self.out.flush()
