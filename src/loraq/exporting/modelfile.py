"""An Ollama ``Modelfile`` beside an exported GGUF, so ``ollama create NAME -f FILE`` works.

It holds ``FROM ./<file>.gguf`` (relative: Ollama resolves it from the
Modelfile's folder) and one ``PARAMETER stop`` per token that ends an answer
(EOS and the chat template's end-of-turn token), so Ollama stops where loraq
stops. The chat template itself travels inside the GGUF
(``tokenizer.chat_template``), from which Ollama picks its prompt template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def stop_strings(tokenizer: Any, generation_config: Any = None) -> list[str]:
    """The texts of the tokens that end an answer (loraq's own stop tokens)."""
    from loraq.data.prompts import stop_token_ids

    texts = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, generation_config)]
    return list(dict.fromkeys(t for t in texts if t))


def modelfile_text(gguf_path: Path, stops: list[str]) -> str:
    """The Modelfile for ``gguf_path`` with ``stops`` as stop parameters."""
    lines = [f"# Ollama: ollama create NAME -f {Path(gguf_path).stem}.Modelfile   (then: ollama run NAME)",
             f"FROM ./{Path(gguf_path).name}"]
    for text in stops:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """``model.gguf`` -> ``model.Modelfile`` (one per export, so several exports can share a folder)."""
    return Path(gguf_path).with_suffix(".Modelfile")
