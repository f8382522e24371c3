"""Calling transformers quietly, and turning its exceptions into one line for a ModelError."""
from __future__ import annotations

import contextlib
from typing import Iterator

from safetensors import SafetensorError

# what transformers/safetensors raise for a file that is corrupt or does not fit its config
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, TypeError, SafetensorError)


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cut at ``limit``."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers (loading, GGUF conversion) while loraq calls it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
