"""``loraq generate`` and ``loraq chat`` as functions: a reply to a prompt, or to a conversation, turn by turn."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TextIO

from loraq.api.loading import load_for_inference
from loraq.models.load import LoadedModel


def generate(prompt: str, *, model: str | None = None, adapter: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: Sequence[str] = (), no_chat_template: bool = False, dtype: str = "auto", quant: str = "auto",
             ignore_base_fingerprint: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
             stream: TextIO | None = None, say: Callable[[str], None] | None = None) -> str:
    """One reply to ``prompt`` (greedy unless ``temperature`` > 0), streamed to ``stream`` as it decodes; it ends
    at the model's stop tokens, before any of the ``stop`` strings, or after ``max_new_tokens``."""
    from loraq.generation.sampling import Sampling
    from loraq.generation.text import generate_text

    Sampling(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))  # bad options fail before loading
    loaded = load_for_inference(model, adapter, dtype=dtype, quant=quant,
                                ignore_base_fingerprint=ignore_base_fingerprint, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, say=say)
    return generate_text(loaded.model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                         chat_template=not no_chat_template, stream=stream)


class ChatSession:
    """A conversation with one loaded model: ``reply(text)`` is one turn (what ``loraq chat`` does per line).

        chat = loraq.chat(adapter="runs/x", system="Be brief.")
        chat.reply("Hello")          # -> the model's answer; the history grows
        chat.reset()                 # back to the system message alone
    """

    def __init__(self, loaded: LoadedModel, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = ()):
        from loraq.generation.sampling import Sampling

        Sampling(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))
        self.loaded = loaded
        self.start = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.start)
        self.options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                        "top_k": top_k, "seed": seed, "stop": tuple(stop)}

    def reply(self, text: str, stream: TextIO | None = None) -> str:
        from loraq.generation.text import generate_text

        self.messages.append({"role": "user", "content": text})
        answer = generate_text(self.loaded.model, self.loaded.tokenizer, self.messages, stream=stream, **self.options)
        self.messages.append({"role": "assistant", "content": answer.strip()})
        return answer

    def reset(self) -> None:
        self.messages = list(self.start)


def chat(*, model: str | None = None, adapter: str | None = None, system: str | None = None,
         max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
         seed: int | None = None, stop: Sequence[str] = (), dtype: str = "auto", quant: str = "auto",
         ignore_base_fingerprint: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
         say: Callable[[str], None] | None = None) -> ChatSession:
    """A :class:`ChatSession` with the model (and adapter, on the base it was trained on) loaded once."""
    from loraq.generation.sampling import Sampling

    Sampling(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))
    loaded = load_for_inference(model, adapter, dtype=dtype, quant=quant,
                                ignore_base_fingerprint=ignore_base_fingerprint, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, say=say)
    return ChatSession(loaded, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, stop=stop)
