"""Atomic file writes: a temp file in the same directory, fsync, then rename over the target.

On any failure the temp file is removed and the previous file (if any) is left as it was; an OSError
(disk full, read-only, no permission, a path component that is a file) becomes a one-line InputError.
In a run spread over several processes only rank 0 writes: the other ranks hold the same results, and a
write of theirs is dropped here, so no file is written twice or raced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import InputError
from .preflight import os_error_message


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` to fill a temp file next to `path`, fsync it, then rename it over `path`."""
    from .distributed import world

    if not world().main:
        return
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        _discard(tmp)
        raise InputError(os_error_message(exc, path)) from exc
    except BaseException:
        _discard(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write_with(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _discard(tmp: str | None) -> None:
    if tmp is None:
        return
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # nothing more can be done; the original error is the one to report


def _fsync_file(name: str) -> None:
    with open(name, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where the platform allows it (best effort: not every file system does)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
