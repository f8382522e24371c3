"""Calling transformers quietly, and turning its exceptions into one line for a ModelError."""
from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator

from safetensors import SafetensorError

# what transformers/safetensors/torch.load raise for a file that is corrupt, does not fit its config, or is a
# pickle holding more than tensors (refused by weights_only)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, TypeError, SafetensorError,
               pickle.UnpicklingError)


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cut at ``limit``.

    torch's weights-only refusal (a pickle that names code to run) gets a line of its own: torch's
    message suggests ``weights_only=False``, the one thing not to do with such a file.
    """
    text = str(exc).strip()
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"the pickle holds objects other than tensors{what}, which would run code when loaded; loraq reads "
                "pickles as plain tensors only, even with --allow-pickle; convert the file to safetensors where you "
                "trust it")
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers (loading, GGUF conversion) while loraq calls it.

    Its loading bars follow its logging switch; the GGUF conversion's bar is a bare ``tqdm`` in
    ``transformers.modeling_gguf_pytorch_utils``, so that module's name is pointed at a pass-through
    for the duration (and put back after).
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # that path raises its own error when it is used
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = _no_bar
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _no_bar(iterable=None, *args, **kwargs):
    return iterable
