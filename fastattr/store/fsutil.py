"""File-system primitives of the write protocol: fsync of files and directories, atomic JSON
replacement, sha256 of a file, the writability probe and the advisory writer locks."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .schema import OWN_PREFIX, PARTIAL_SUFFIX

try:  # POSIX advisory lock: one writer per run directory; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_TRIES, LOCK_RETRY_S = 6, 0.1


def now() -> str:
    """The current UTC time, ISO 8601 to the second (manifest timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def fastattr_version() -> str:
    # Read from the installed metadata rather than `from .. import __version__`, which would
    # import fastattr/__init__ (and torch) and tie the store to import order.
    try:
        from importlib.metadata import version

        return version("fastattr")
    except Exception:  # not installed (e.g. loaded from a source tree)
        return "unknown"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is; some platforms cannot fsync a
    # directory, which only weakens power-loss (not process-kill) safety, so that is not fatal.
    try:
        fsync_path(path)
    except OSError as exc:  # pragma: no cover - platform dependent
        logger.debug("could not fsync directory %s: %s", path, exc)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """tmp + fsync + rename + fsync(dir): readers see the old or the new file, never a torn one.
    The tmp file is named in fastattr's own namespace (``.fastattr-<name>.partial``), so writing
    it can never clobber a user's file and a leftover one is provably fastattr's to delete."""
    tmp = path.with_name(OWN_PREFIX + path.name + PARTIAL_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def probe_writable(directory: Path) -> None:
    """Create and delete a file in directory; OSError if that is not possible."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".fastattr-probe-", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    os.unlink(probe)


def acquire_lock(path: Path, *, in_use: str) -> int | None:
    """Take an exclusive, non-blocking flock on path (created if needed) and return the descriptor
    that holds it (None where flock does not exist). StoreError(in_use) if another process holds it.
    The kernel releases a flock when the process dies, so a killed run never leaves a stale lock."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path}: {exc}") from exc
    # A few tries over ~0.5 s: readers (lock_held) probe with a shared lock for an instant, which
    # must not make a writer fail; a live writer holds the lock far longer.
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if attempt == LOCK_TRIES - 1:
                os.close(fd)
                raise StoreError(in_use) from exc
            time.sleep(LOCK_RETRY_S)
    raise AssertionError("unreachable")


def release_lock(fd: int) -> None:
    os.close(fd)  # closing the descriptor drops the flock


def lock_held(path: Path) -> bool:
    """Whether a process holds path's flock (a writer is alive), probed with a shared lock held for
    an instant (acquire_lock retries briefly, so a writer starting at that instant still gets in)."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: no writer
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the probe lock


def ensure_unlocked(path: Path, *, in_use: str) -> None:
    """StoreError(in_use) if a process holds path's flock (probed by taking and dropping it);
    a file that is gone is not locked."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise StoreError(in_use) from exc
    finally:
        os.close(fd)  # drops the probe lock
