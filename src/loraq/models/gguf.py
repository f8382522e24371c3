"""GGUF files: dequantized once by transformers into a safetensors folder in the cache.

``converted_folder(path)`` returns ``<cache>/gguf/<stem>-<key>``, where ``key``
hashes the file's absolute path, size and modification time: the first call
converts (tens of seconds for a small model, mostly the tokenizer), every
later call finds the folder and costs nothing. A changed file gets a new key.
The folder holds float32 weights, so the dequantized GGUF values are kept
exactly, plus the config, generation config and tokenizer (with its chat
template) that transformers reads out of the GGUF metadata.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from loraq.errors import ModelError
from loraq.models.cache import (
    gguf_dir,
    is_complete,
    remove_stale_temporaries,
    write_marker,
)
from loraq.models.hf_calls import LOAD_ERRORS, exception_line, quiet_transformers
from loraq.paths import atomic_dir, file_lock


def cache_key(path: Path) -> str:
    """16 hex digits of sha256(absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def converted_folder(path: Path, progress: bool = True) -> Path:
    """The cached safetensors folder for GGUF file ``path``, converting it on first use."""
    path = Path(path).resolve()
    final = gguf_dir() / f"{path.stem}-{cache_key(path)}"
    if is_complete(final):
        return final
    with file_lock(gguf_dir() / f".{final.name}.lock", waiting=f"converting {path.name}"):
        if is_complete(final):  # another process converted it while we waited
            return final
        remove_stale_temporaries(final)
        if progress:
            print(f"loraq: converting {path.name} to safetensors in {final} (once) ...", file=sys.stderr, flush=True)
        st = path.stat()
        with atomic_dir(final, replace=True) as out:
            convert_gguf_to_folder(path, out)
            write_marker(out, source="gguf", file=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns)
    return final


def convert_gguf_to_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers and write it as a float32 safetensors folder.

    float32 keeps the dequantized values exactly (Q4_1's q*d + m is not
    representable in bf16), so nothing is rounded twice.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.models.hf_folder import (
        saved_state_dict,
        write_config,
        write_generation_config,
        write_state_dict,
        write_tokenizer,
    )

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelError(f"reading GGUF needs the `gguf` package ({exc}); run `pip install gguf`") from None
    except LOAD_ERRORS as exc:
        raise ModelError(f"--model {gguf_path}: cannot read this GGUF file ({exception_line(exc)})") from None
    write_state_dict(saved_state_dict(model), out)
    write_config(model.config, out, dtype=torch.float32)
    write_generation_config(model, out)
    write_tokenizer(tok, out)
