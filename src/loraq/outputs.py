"""The overwrite rule, for every command that writes a folder: nothing of the user's is replaced.

* a missing or empty folder is written;
* a non-empty one only with ``--overwrite``, and only when loraq made it: it
  holds loraq's marker -- ``run.json`` in a run folder, ``loraq_output.json``
  in a folder ``loraq merge`` / ``loraq quantize`` (or a later command) wrote;
* never a folder that is an input of the same command, nor a file.

Every refusal is a :class:`~loraq.errors.ConfigError` naming the flag and the way out.
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from pathlib import Path

from loraq.errors import ConfigError

MARKER = "loraq_output.json"


def check_output_folder(out: Path, overwrite: bool, *, flag: str = "--out", marker: str = MARKER,
                        inputs: Iterable[Path | None] = ()) -> bool:
    """Whether ``out`` will be replaced (True) or is new / empty (False); ConfigError where it may not be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; give a folder")
    for path in inputs:
        if path is not None and Path(path).exists() and out.exists() and out.resolve() == Path(path).resolve():
            raise ConfigError(f"{flag} {out} is an input of this command; write to another folder")
    if not (out.is_dir() and any(out.iterdir())):
        return False
    if not overwrite:
        raise ConfigError(f"{flag} {out} exists and is not empty; pass --overwrite to replace it or choose another "
                          "folder")
    if not (out / marker).is_file():
        raise ConfigError(f"--overwrite: {out} was not made by loraq (no {marker}); refusing to delete it, "
                          f"choose another {flag}")
    return True


def write_marker(folder: Path, command: str) -> None:
    """Mark ``folder`` (while it is still the temporary folder of an atomic write) as loraq's own output."""
    from loraq import __version__

    record = {"made_by": f"loraq {__version__}", "command": command,
              "created": datetime.datetime.now().isoformat(timespec="seconds")}
    (Path(folder) / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
