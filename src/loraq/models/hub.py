"""Hub ids (``org/name``): downloaded through huggingface_hub into its own cache.

Only what loading needs is fetched: the config, the tokenizer files and the
safetensors weights (plus ``*.bin``/``*.pt`` pickles when ``allow_pickle``).
With ``HF_HUB_OFFLINE=1`` (or ``LORAQ_NO_HUB=1``) only the local hub cache is
used. An unreachable hub, a missing repository or a gated one is one
:class:`~loraq.errors.ModelError` line saying what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

from loraq.errors import ModelError

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
OTHER_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken", "tokenizer*"]


def hub_offline() -> bool:
    """True when the hub must not be contacted (read at call time, not import time)."""
    on = {"1", "true", "yes", "on"}
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in on or os.environ.get("LORAQ_NO_HUB", "0").lower() in on


def hub_cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read at call time; None lets huggingface_hub decide."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def download_snapshot(repo_id: str, revision: str | None = None, allow_pickle: bool = False,
                      etag_timeout: float = 10) -> Path:
    """The local snapshot folder of ``repo_id`` (downloaded if needed and allowed)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelError("hub ids need the `huggingface_hub` package; run `pip install huggingface_hub`") from None
    offline = hub_offline()
    patterns = WEIGHT_PATTERNS + OTHER_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                 local_files_only=offline, etag_timeout=etag_timeout,
                                 cache_dir=hub_cache_dir())
    except GatedRepoError:
        raise ModelError(f"--model {repo_id}: the hub repository is gated; accept its terms on the hub and log in "
                         "with `hf auth login`, or pass a local folder") from None
    except RevisionNotFoundError:
        raise ModelError(f"--model {repo_id}@{revision}: no such revision on the hub") from None
    except RepositoryNotFoundError:
        raise ModelError(f"--model {repo_id}: no such model on the hub (or it is private: log in with "
                         "`hf auth login`); for a local folder check the path") from None
    except Exception as exc:  # connection refused, DNS, timeouts, offline with nothing cached
        why = ("offline (HF_HUB_OFFLINE) and no cached copy" if offline
               else f"the hub is unreachable ({type(exc).__name__})")
        raise ModelError(f"--model {repo_id}: not a local path, and {why}; pass a local model folder, or set "
                         "HF_HUB_OFFLINE=1 with a copy in the Hugging Face cache") from None
    return Path(path)
