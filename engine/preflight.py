"""Cheap checks before any model is loaded: can the outputs be written where the user asked?

Each check raises `InputError` with one line naming the path and the fix. Nothing here creates a file or
directory, and nothing imports torch, so the CLI and the TUI can call these before the slow work starts.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import InputError


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists (a file or a directory)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_creatable(path: Path, what: str) -> None:
    """Refuse when `path` (which does not exist) could not be created: an ancestor is a file, or the
    nearest existing ancestor directory is not writable."""
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise InputError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {str(path)!r}: cannot write in {str(parent)!r} (read-only or no permission): "
                         "choose another directory")


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, what: str = "--out") -> Path:
    """Check that `path` can become a new output directory; returns it as an expanded Path.

    Refused: a file at `path`; an existing directory (unless `overwrite`); an ancestor that is a file; a
    nearest existing ancestor that is not writable. Creates nothing."""
    out = Path(path).expanduser()
    if os.path.lexists(out):
        if not out.is_dir():
            raise InputError(f"{what} {str(out)!r} is a file, not a directory: choose a new directory")
        if not overwrite:
            raise InputError(f"{what} {str(out)!r} already exists: choose a new directory or pass --overwrite")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"{what} {str(out)!r}: cannot write in it (read-only or no permission): "
                             "choose another directory")
        return out
    check_creatable(out, what)
    return out


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False, what: str = "--session") -> Path:
    """Check that `path` can become a new output file; returns it as an expanded Path.

    Refused: a directory at `path`; an existing file (unless `overwrite`); a parent that is a file or
    cannot be created or written. Creates nothing."""
    out = Path(path).expanduser()
    if os.path.lexists(out):
        if out.is_dir():
            raise InputError(f"{what} {str(out)!r} is a directory, not a file: choose a file name")
        if not overwrite:
            raise InputError(f"{what} {str(out)!r} already exists: choose a new file name or pass --overwrite")
        # replacing it atomically writes a temp file in its directory, then renames it over the file
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise InputError(f"{what} {str(out)!r}: cannot write in {str(out.parent)!r} (read-only or no "
                             "permission): choose another directory")
        return out
    check_creatable(out, what)
    return out


def os_error_message(exc: OSError, path: str | os.PathLike) -> str:
    """One line for an OSError met while writing `path`: the problem and the fix."""
    where = str(path)
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on device writing {where}: free space, then resume"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where}: read-only or no permission; choose another directory"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot write {where}: a component of the path is a file, not a directory; choose another path"
    if code == errno.EISDIR:
        return f"cannot write {where}: it is a directory; choose a file name"
    reason = os.strerror(code) if code else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"cannot write {where}: {reason}; check the path and the disk, then retry"


def hub_offline() -> bool:
    """Whether the user asked for offline hub use (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT, through the https proxy when one is set) cannot be reached,
    or None when a TCP connection to it opens within `timeout` seconds. Name resolution and connecting
    run in a daemon thread, so the answer never takes much longer than `timeout`."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = parts.hostname or host, parts.port or 8080
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except socket.gaierror:
            result.append(f"cannot resolve {host}")
        except socket.timeout:
            result.append(f"no answer from {host}:{port}")
        except OSError as exc:
            result.append(f"cannot connect to {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host}:{port}"
