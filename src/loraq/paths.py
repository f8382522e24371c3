"""Where loraq keeps things, and how it writes them without leaving halves behind.

* The user cache is ``$LORAQ_CACHE``, else ``$XDG_CACHE_HOME/loraq``, else
  ``~/.cache/loraq``.
* Every folder or file loraq produces is written under a temporary name next
  to its destination, fsynced, then renamed into place: a killed process
  leaves either the old state or the new one, never a half.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("LORAQ_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "loraq"


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (the rename itself) on POSIX."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is fsynced and renamed to ``final``.

    With ``replace=True`` an existing ``final`` is swapped out (old one removed
    only after the new one is in place); otherwise an existing ``final`` is an
    error for the caller to have checked. On an exception the temporary folder
    is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a model folder should read like any other
    try:
        yield tmp
        _readable_like_any_file(tmp)
        fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _readable_like_any_file(folder: Path) -> None:
    """Files made through mkstemp (ours, safetensors') are 0600; give them the mode the user's umask gives any file."""
    mode = 0o666 & ~_umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is fsynced and renamed to ``final``.

    An existing ``final`` is replaced in one rename (the caller decides whether
    that is allowed). On an exception the temporary file is removed and
    ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the user's group
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via temp + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the user's group
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """An exclusive advisory lock (e.g. two ranks fetching the default model at once). Each lock guards one
    thing (one model's fetch, one GGUF's conversion, one token store), so unrelated work never waits; when this
    one must, ``waiting`` (what the other process is doing) is said on stderr first -- except by the ranks of a
    multi-process run, which wait for each other by design and report their errors as one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting and int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # a rank waits for its siblings quietly
                print(f"loraq: waiting for another loraq process {waiting} ({path}) ...", file=sys.stderr, flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
