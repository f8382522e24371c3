"""Text generation from a loaded model: greedy by default, sampling on request, streamed.

``generate_text(model, tokenizer, prompt)`` renders a single user turn with
the chat template as training renders it (:mod:`loraq.data.prompts`; the raw
prompt with ``chat_template=False``), generates up to
``max_new_tokens`` and returns the new text. ``temperature == 0`` is greedy
decoding (argmax at every step); ``temperature > 0`` samples from
``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
probability reaches ``top_p``. Generation stops at the same tokens as exact
match during training (end-of-turn, end-of-sequence, the generation config's).
With ``stream`` (a text file), each piece of text is
written and flushed as soon as it decodes.
"""
from __future__ import annotations

from typing import Any, TextIO

import torch
from transformers import GenerationConfig, TextStreamer

from loraq.errors import ConfigError


def check_options(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """A ConfigError naming the flag when a decoding option is out of range."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (got {top_p})")


def build_prompt_ids(tokenizer: Any, prompt: str | list[dict], chat_template: bool = True) -> torch.Tensor:
    """Token ids [1, n] of ``prompt``: one user turn (or, for ``loraq chat``, a whole conversation) rendered as
    training renders it (:func:`loraq.data.prompts.prompt_ids`), or the raw text without ``chat_template``."""
    from loraq.data.prompts import prompt_ids

    if isinstance(prompt, list):
        ids = prompt_ids(tokenizer, messages=prompt)
    elif chat_template:
        ids = prompt_ids(tokenizer, messages=[{"role": "user", "content": prompt}])
    else:
        ids = prompt_ids(tokenizer, prompt=prompt)
    return torch.tensor([ids], dtype=torch.long)


def generate_text(model: Any, tokenizer: Any, prompt: str | list[dict], *, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, chat_template: bool = True,
                  stream: TextIO | None = None) -> str:
    """Generate a reply to ``prompt``; see the module docstring for the decoding rules."""
    from loraq.data.prompts import pad_token_id, stop_token_ids

    check_options(max_new_tokens, temperature, top_p)
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = build_prompt_ids(tokenizer, prompt, chat_template).to(device)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=top_p if sampling else None, top_k=None, eos_token_id=stops or None,
        pad_token_id=pad_token_id(tokenizer, stops),
    )
    streamer = _TextStreamTo(tokenizer, stream) if stream is not None else None
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=config, streamer=streamer)
    new = output[0, input_ids.shape[1]:].tolist()
    cut = next((k for k, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True)


class _TextStreamTo(TextStreamer):
    """transformers' TextStreamer (which decodes at word boundaries), writing to any text file."""

    def __init__(self, tokenizer: Any, stream: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()
