"""Run directories: attribution results as HDF5 shards plus a manifest, crash-safe and lazy to read.

A run directory holds ``manifest.json`` and finalized shards ``shard-00000.h5``, ... (shard format,
schema 1, in docs/architecture.md and the design notes). The manifest is the only source of truth:
a shard is trusted exactly when the manifest lists it, and it is listed only after it is complete
on disk. The write protocol for one shard is

    write  shard-XXXXX.h5.partial   (h5py; a file killed before close() is unreadable)
    close, fsync the file
    os.replace -> shard-XXXXX.h5, fsync the directory
    sha256 of the final file
    manifest.json.partial (fsync) -> os.replace -> manifest.json, fsync the directory

so a process killed at any instant leaves either the old manifest (the new shard, finished or not,
is an untrusted orphan, deleted when the run is reopened) or the new one (the shard is already
durable and its checksum matches). ``*.partial`` files are never trusted and are deleted on reopen.

Writing: ``RunWriter`` takes ``Block``s from the caller and hands them through a bounded queue to
ONE writer thread (h5py serialises every call behind a global lock, so more threads would not help;
the bounded queue is the backpressure that keeps memory flat when the disk is the bottleneck).
Reading: ``open_run`` -> ``RunReader``, indexed by global sample index, reading only what is asked.
Checking: ``verify_run`` recomputes checksums and coverage.

This module imports nothing from the rest of fastattr (only numpy and h5py), so tools and tests can
load it without importing torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:  # POSIX advisory lock: one writer per run directory; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]
from .errors import RunMismatchError, StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "STAT_FIELDS",
    "Block",
    "RunMismatchError",
    "RunReader",
    "RunWriter",
    "StoreError",
    "VerifyReport",
    "open_run",
    "verify_run",
]

SCHEMA_VERSION = 1
STAT_FIELDS = ("sum", "l1", "l2", "absmax")  # float32; plus "nonfinite" (int32)
STAT_KEYS = (*STAT_FIELDS, "nonfinite")

MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
LOCK_NAME = ".fastattr-writer.lock"
# Distributed runs (torchrun): rank 0 writes manifest.json and holds LOCK_NAME; every other rank
# holds its own lock and lists the shards it finalized in its own fragment until rank 0 merges them.
RANK_LOCK_FORMAT = ".fastattr-writer.rank-{:05d}.lock"
FRAGMENT_FORMAT = "manifest.rank-{:05d}.json"
_FRAGMENT = re.compile(r"manifest\.rank-\d+\.json")
_RANK_LOCK = re.compile(r"\.fastattr-writer\.rank-(\d+)\.lock")
STORAGE_DTYPES = ("float32", "float16")
COMPRESSIONS = ("lzf", "gzip", "none")
GZIP_LEVEL = 4
STATUSES = ("running", "complete")

# Per-sample scalar datasets and their on-disk dtypes (the contract's layout).
SCALAR_DTYPES: dict[str, type[np.generic]] = {
    "output": np.float32,
    "baseline_output": np.float32,
    "delta": np.float32,
    "n_steps": np.int32,
}
STAT_DTYPES: dict[str, type[np.generic]] = {**dict.fromkeys(STAT_FIELDS, np.float32), "nonfinite": np.int32}

# Attribution chunks aim at 256 KiB: inside the contract's 64 KiB..1 MiB window for any row size up
# to 1 MiB, big enough for compression to pay off, small enough that reading one sample stays cheap.
CHUNK_TARGET_BYTES = 256 * 1024
WRITE_CHUNK_CACHE_BYTES = 4 * 1024 * 1024
# Scalar datasets: 16384 rows (64 KiB of float32) per chunk keeps field() reads to a few chunks.
SCALAR_CHUNK_ROWS = 16384

# Config keys that change from one launch of the same run to the next and so must not block a
# resume (compared at any depth). Callers can replace the set with RunWriter(volatile_keys=...).
VOLATILE_CONFIG_KEYS = frozenset(
    {"created", "updated", "started", "finished", "time", "times", "timing", "timings", "elapsed", "wall_s", "host", "hostname", "pid"}
)

_SHARD_ID = re.compile(r"-(\d+)\.h5$")


@dataclass
class Block:
    """One batch of results for contiguous global indices [start, stop), as CPU numpy arrays.

    The writer keeps references to these arrays until its thread has written them: do not
    modify them after put() (or call put(block, copy=True)). The shard's ``index`` dataset is
    np.arange(start, stop).
    """

    start: int
    stop: int
    attributions: dict[str, np.ndarray]  # name -> (rows, *feature_shape), float32 (cast to the storage dtype)
    target: np.ndarray  # (rows,) or (rows, k) int64
    output: np.ndarray  # (rows,) float32, F(x) at the target
    baseline_output: np.ndarray  # (rows,) float32, F(x0) (NaN for methods without a baseline)
    delta: np.ndarray  # (rows,) float32 completeness residual (NaN when not defined)
    n_steps: np.ndarray  # (rows,) int32
    stats: dict[str, np.ndarray]  # STAT_FIELDS (float32) and "nonfinite" (int32), each (rows,)
    # further per-sample fields, stored as extras/<name> (e.g. "lengths" of padded token rows)
    extras: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def _fastattr_version() -> str:
    # Read from the installed metadata rather than `from . import __version__`, which would
    # import fastattr/__init__ (and torch) and tie this module to import order.
    try:
        from importlib.metadata import version

        return version("fastattr")
    except Exception:  # not installed (e.g. loaded from a source tree)
        return "unknown"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is; some platforms cannot fsync a
    # directory, which only weakens power-loss (not process-kill) safety, so that is not fatal.
    try:
        _fsync_path(path)
    except OSError as exc:  # pragma: no cover - platform dependent
        logger.debug("could not fsync directory %s: %s", path, exc)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    """tmp + fsync + rename + fsync(dir): readers see the old or the new file, never a torn one.
    The tmp file ends in .partial, so a leftover one is cleaned like any other partial."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged [start, stop) ranges (touching ranges are joined)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _complement(ranges: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    for a, b in _merge(ranges):
        if a > pos:
            out.append((pos, min(a, total)))
        pos = max(pos, b)
    if pos < total:
        out.append((pos, total))
    return [(a, b) for a, b in out if a < b]


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """Sorted integers -> [start, stop) runs of consecutive values (for readable messages)."""
    if values.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate(([values[0]], values[breaks + 1]))
    stops = np.concatenate((values[breaks], [values[-1]])) + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _fmt_ranges(ranges: list[tuple[int, int]], limit: int = 5) -> str:
    text = ", ".join(f"[{a}, {b})" for a, b in ranges[:limit])
    return text + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it will read back from the manifest (tuples -> lists, int keys -> str), so a
    freshly passed config and a stored one compare equal when they mean the same thing."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable: {exc}") from exc


def _config_diff(old: Any, new: Any, volatile: frozenset[str], prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ (volatile keys ignored at any depth)."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs: list[str] = []
        for key in sorted((set(old) | set(new)) - volatile):
            path = f"{prefix}.{key}" if prefix else key
            if key not in old or key not in new:
                diffs.append(path)
            else:
                diffs.extend(_config_diff(old[key], new[key], volatile, path))
        return diffs
    # Compare serialised forms: NaN == NaN there, and int/float spellings stay distinct as stored.
    same = json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)
    return [] if same else [prefix or "config"]


@dataclass(frozen=True)
class _Shard:
    """One manifest entry."""

    file: str
    start: int
    stop: int
    rows: int
    sha256: str

    def entry(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "stop": self.stop, "rows": self.rows, "sha256": self.sha256}


def _shard_id(name: str) -> int | None:
    m = _SHARD_ID.search(name)
    return int(m.group(1)) if m else None


def _read_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate manifest.json; any problem is a StoreError naming the file."""
    if not path.is_file():
        raise StoreError(f"{path}: no manifest (not a fastattr run directory, or the run never started)")
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read the manifest: {exc}") from exc
    if not isinstance(man, dict):
        raise StoreError(f"{path}: the manifest is not a JSON object")
    if man.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {man.get('schema_version')!r} is not supported (this fastattr reads {SCHEMA_VERSION})")
    total = man.get("total")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise StoreError(f"{path}: 'total' must be a non-negative integer, got {total!r}")
    if man.get("status") not in STATUSES:
        raise StoreError(f"{path}: 'status' must be one of {STATUSES}, got {man.get('status')!r}")
    if not isinstance(man.get("config"), dict):
        raise StoreError(f"{path}: 'config' must be an object")
    shards = man.get("shards")
    if not isinstance(shards, list):
        raise StoreError(f"{path}: 'shards' must be a list")
    parsed: list[_Shard] = []
    for i, entry in enumerate(shards):
        try:
            s = _Shard(str(entry["file"]), int(entry["start"]), int(entry["stop"]), int(entry["rows"]), str(entry["sha256"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise StoreError(f"{path}: shard entry {i} is malformed ({exc!r}): {entry!r}") from exc
        # Shard files live in the run directory itself: refuse paths that would escape it.
        if not s.file or Path(s.file).name != s.file or s.file in (".", ".."):
            raise StoreError(f"{path}: shard entry {i} has an invalid file name {s.file!r}")
        if not (0 <= s.start < s.stop <= total) or s.rows != s.stop - s.start:
            raise StoreError(f"{path}: shard {s.file} has an invalid range [{s.start}, {s.stop}) / rows {s.rows} (total {total})")
        parsed.append(s)
    man["shards"] = sorted(parsed, key=lambda s: s.start)
    return man


def _read_fragments(run_dir: Path, run_id: str | None, total: int) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """The rank fragments in run_dir: (path, parsed) of those belonging to run ``run_id``, and the
    paths of stale ones (another run's, e.g. left by a crash before an overwrite)."""
    ours: list[tuple[Path, dict[str, Any]]] = []
    stale: list[Path] = []
    for p in sorted(run_dir.iterdir()):
        if not _FRAGMENT.fullmatch(p.name):
            continue
        try:
            frag = _read_manifest(p)
        except StoreError:
            if not p.exists():  # merged and deleted by rank 0 while we listed the directory
                continue
            raise
        if run_id is not None and frag.get("run_id") == run_id and frag["total"] == total:
            ours.append((p, frag))
        else:
            stale.append(p)
    return ours, stale


def _union(base: list[_Shard], extra: Iterable[_Shard], where: Path) -> list[_Shard]:
    """base plus extra, one entry per file, sorted by start; the same file listed twice must be
    listed identically (rank 0 may have merged a fragment before it was deleted)."""
    by_file = {s.file: s for s in base}
    for s in extra:
        old = by_file.setdefault(s.file, s)
        if old != s:
            raise StoreError(f"{where}: lists {s.file} as [{s.start}, {s.stop}) sha256 {s.sha256[:12]}..., another listing as [{old.start}, {old.stop}) {old.sha256[:12]}...")
    return sorted(by_file.values(), key=lambda s: s.start)


def _read_listing(run_dir: Path) -> dict[str, Any]:
    """manifest.json plus the shards listed by rank fragments of the same run (a distributed run
    whose ranks finalized shards that rank 0 has not merged yet, e.g. after a crash): every
    finalized shard, as one run. ``fragments`` names the fragment files merged here."""
    man = _read_manifest(run_dir / MANIFEST_NAME)
    ours, _ = _read_fragments(run_dir, man.get("run_id"), man["total"])
    for path, frag in ours:
        man["shards"] = _union(man["shards"], frag["shards"], path)
    man["fragments"] = [path.name for path, _ in ours]
    return man


def _overlaps(shards: list[_Shard]) -> list[tuple[_Shard, _Shard]]:
    """Pairs (earlier, later) of shards, sorted by start, whose ranges overlap."""
    out = []
    furthest: _Shard | None = None
    for s in shards:
        if furthest is not None and s.start < furthest.stop:
            out.append((furthest, s))
        if furthest is None or s.stop > furthest.stop:
            furthest = s
    return out


def _check_shard_file(f: h5py.File, shard: _Shard) -> None:
    """Cheap structural checks (metadata only, no data read): attributes and row counts."""
    attrs = f.attrs
    for key, want in (("schema_version", SCHEMA_VERSION), ("start", shard.start), ("stop", shard.stop)):
        got = attrs.get(key)
        if got is None or int(got) != want:
            raise StoreError(f"{f.filename}: attribute {key}={got!r} does not match the manifest ({want})")
    bad: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and (obj.ndim == 0 or obj.shape[0] != shard.rows):
            bad.append(f"{name} {obj.shape}")

    f.visititems(visit)
    if "index" not in f or "attributions" not in f:
        raise StoreError(f"{f.filename}: missing 'index' or 'attributions'")
    if bad:
        raise StoreError(f"{f.filename}: datasets without {shard.rows} rows: {', '.join(bad)}")


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


class _OpenShard:
    """The shard being written: an h5py file named *.partial holding contiguous rows from start."""

    def __init__(self, path: Path, shard_id: int, start: int) -> None:
        self.path = path  # the .partial path
        self.shard_id = shard_id
        self.start = start
        self.rows = 0
        self.opened = time.monotonic()
        self.file: h5py.File | None = None

    @property
    def stop(self) -> int:
        return self.start + self.rows

    def close_quietly(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception as exc:  # the file is abandoned anyway
                logger.debug("closing %s: %s", self.path, exc)
            self.file = None


_CLOSE = object()  # queue sentinels
_ABORT = object()


class RunWriter:
    """Writes Blocks of one run into ``run_dir`` through one background thread.

    Creating a writer on a directory that holds a run resumes it (``covered`` / ``missing`` say
    what is left) if its config and total match, else raises RunMismatchError; ``overwrite=True``
    starts afresh. One writer per directory at a time (an advisory lock enforces it on POSIX).
    Use as a context manager, or call close() (or abort()) yourself.

    Distributed runs (``rank``/``world_size``, see fastattr/distributed.py): rank 0's writer is the
    coordinator. It opens first, holds the directory lock, merges what earlier launches' ranks left
    in their fragments into manifest.json and deletes untrusted files; its ``run_id`` and
    ``first_shard_id`` are then handed to the other ranks, whose writers join that run: each holds
    its own rank lock, deletes nothing, and lists the shards it finalizes in its own fragment
    ``manifest.rank-XXXXX.json`` (same format as the manifest). Shard ids are
    ``first_shard_id + rank + k * world_size``, so names never collide across ranks or launches.
    Rank 0's close() merges every fragment into manifest.json: close it after the other ranks'.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: dict[str, Any],
        total: int,
        shard_rows: int = 4096,
        storage_dtype: str = "float32",
        compression: str = "lzf",
        queue_size: int = 4,
        resume: bool = True,
        overwrite: bool = False,
        shard_prefix: str = "shard",
        max_shard_seconds: float | None = None,
        volatile_keys: Iterable[str] = VOLATILE_CONFIG_KEYS,
        rank: int = 0,
        world_size: int = 1,
        run_id: str | None = None,
        first_shard_id: int | None = None,
    ) -> None:
        """max_shard_seconds: also finalize an open shard once it is this old (after the block that
        crosses the limit), bounding the work a crash can lose when blocks are slow to come.
        volatile_keys: config keys ignored when checking that a resume matches the stored run.
        rank, world_size: this writer's place in a distributed run; a rank > 0 joins the run that
        rank 0's writer prepared and needs that writer's run_id and first_shard_id."""
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        for name, value, low in (("shard_rows", shard_rows, 1), ("queue_size", queue_size, 1), ("total", total, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not shard_prefix or Path(shard_prefix).name != shard_prefix:
            raise ValueError(f"shard_prefix must be a plain file-name prefix, got {shard_prefix!r}")
        if max_shard_seconds is not None and not max_shard_seconds > 0:
            raise ValueError(f"max_shard_seconds must be positive, got {max_shard_seconds!r}")
        for name, value, low in (("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if rank > 0 and (not run_id or not isinstance(first_shard_id, int) or first_shard_id < 0):
            raise ValueError(f"rank {rank} joins rank 0's run: pass rank 0's writer's run_id and first_shard_id (got {run_id!r}, {first_shard_id!r})")
        if rank > 0 and overwrite:
            raise ValueError(f"only rank 0 may overwrite a run (rank {rank} was asked to)")

        self.run_dir = Path(run_dir)
        self.config = _jsonable(config)
        self.total = int(total)
        self.shard_rows = int(shard_rows)
        self.storage_dtype = np.dtype(storage_dtype)
        self.compression = compression
        self.shard_prefix = shard_prefix
        self.max_shard_seconds = max_shard_seconds
        self._volatile = frozenset(volatile_keys)
        self._method = str(self.config.get("method", ""))
        self._config_json = json.dumps(self.config, sort_keys=True)

        self._lock = threading.RLock()  # guards _shards / _status, shared with the writer thread
        self._shards: list[_Shard] = []
        self._status = "running"
        self._created = _now()
        self._next_id = 0
        # Shapes every block must keep: {"attributions": {name: feature_shape}, "target": trailing shape}.
        self._expect: dict[str, Any] | None = None
        self._claimed: list[tuple[int, int]] = []  # ranges finalized or handed to put(), merged
        self._lock_fd: int | None = None
        self._error: BaseException | None = None
        self._aborting = False
        self._closed = False
        self._open: _OpenShard | None = None
        self._overflow_warned = False
        self.rank, self.world_size = int(rank), int(world_size)
        self._fragment = self.rank > 0  # lists its shards in a fragment; rank 0 merges them
        self.run_id: str | None = run_id  # identifies the run; rank 0's is read or made on open
        self.first_shard_id = first_shard_id
        self._base_files: set[str] = set()  # a rank > 0's view of the shards listed before it joined

        self._prepare_directory(resume=resume, overwrite=overwrite)
        self._claimed = _merge((s.start, s.stop) for s in self._shards)

        self._queue: queue.Queue[Any] = queue.Queue(maxsize=int(queue_size))
        self._final_status: bool | None = None
        self._merge_on_close = True
        self._thread = threading.Thread(target=self._run, name=f"fastattr-writer:{self.run_dir.name}", daemon=True)
        self._thread.start()

    # -- directory preparation (caller thread, before the writer thread exists) -------------------

    def _prepare_directory(self, *, resume: bool, overwrite: bool) -> None:
        d = self.run_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create run directory {d}: {exc}") from exc
        if not d.is_dir():
            raise StoreError(f"run directory {d} is not a directory")
        # Fail here, not in the writer thread minutes later: prove we can create files.
        try:
            fd, probe = tempfile.mkstemp(dir=d, prefix=".fastattr-probe-", suffix=PARTIAL_SUFFIX)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StoreError(f"run directory {d} is not writable: {exc}") from exc
        self._acquire_lock()
        try:
            self._load_or_create(resume=resume, overwrite=overwrite)
        except OSError as exc:
            self._release_lock()
            raise StoreError(f"cannot prepare run directory {d}: {exc}") from exc
        except BaseException:
            self._release_lock()
            raise

    def _acquire_lock(self) -> None:
        if fcntl is None:  # pragma: no cover - non-POSIX
            return
        path = self.run_dir / (RANK_LOCK_FORMAT.format(self.rank) if self._fragment else LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {path}: {exc}") from exc
        try:
            # flock is released by the kernel when the process dies, so a killed run never
            # leaves a stale lock behind.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            who = f"another process writing as rank {self.rank}" if self._fragment else "another RunWriter"
            raise StoreError(f"run directory {self.run_dir} is in use by {who} (lock {path}); close() it first") from exc
        self._lock_fd = fd
        if not self._fragment:
            try:
                self._check_rank_locks()
            except BaseException:
                self._release_lock()
                raise

    def _check_rank_locks(self) -> None:
        """The coordinator is about to merge fragments and delete untrusted files: refuse while a
        rank of an earlier launch still writes here (its process holds its rank lock)."""
        for p in self.run_dir.iterdir():
            m = _RANK_LOCK.fullmatch(p.name)
            if m is None:
                continue
            try:
                fd = os.open(p, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise StoreError(f"run directory {self.run_dir} is in use: rank {int(m.group(1))} of a distributed run still writes into it (lock {p})") from exc
            finally:
                os.close(fd)  # drops the probe lock

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _load_or_create(self, *, resume: bool, overwrite: bool) -> None:
        d = self.run_dir
        manifest_path = d / MANIFEST_NAME
        if self._fragment:
            self._join(manifest_path)
            assert self.first_shard_id is not None  # checked in __init__
            self._next_id = self.first_shard_id + self.rank
            return
        existing = manifest_path.exists()
        if existing and not overwrite and not resume:
            raise StoreError(f"{d} already holds a run ({manifest_path} exists); pass resume=True or overwrite=True")

        for p in d.glob("*" + PARTIAL_SUFFIX):
            logger.info("deleting unfinished file %s", p)
            p.unlink(missing_ok=True)

        if existing and not overwrite:
            self._resume_from(manifest_path)
            had_id = self.run_id is not None
            if self.run_id is None:  # a manifest from before run ids: the ranks need one to join
                self.run_id = uuid.uuid4().hex
            found = self._absorb_fragments()
            if found or not had_id:
                self._write_manifest()  # lists the fragments' shards before the fragments go
                for p in found:
                    p.unlink(missing_ok=True)
        else:
            # Fragments go first: once the new manifest exists their shards are mere orphans.
            for p in d.iterdir():
                if _FRAGMENT.fullmatch(p.name):
                    p.unlink(missing_ok=True)
            self.run_id = uuid.uuid4().hex  # a new run: fragments of any other are ignored
            if existing:
                self._discard_existing(manifest_path)
            else:
                # Write the manifest before any shard: the directory is then recognisably this run,
                # and a crash before the first shard still leaves something resume can check.
                self._write_manifest()
        self._delete_orphans()
        ids = [i for i in (_shard_id(s.file) for s in self._shards) if i is not None]
        self.first_shard_id = max(ids) + 1 if ids else 0
        self._next_id = self.first_shard_id

    def _join(self, manifest_path: Path) -> None:
        """A rank > 0 joins the run rank 0 prepared: same run id and config; deletes nothing."""
        if not manifest_path.is_file():
            raise StoreError(
                f"rank {self.rank}: no {manifest_path}; rank 0 writes it before the other ranks start, "
                "so the run directory must be on a filesystem that every rank (every node) shares"
            )
        man = _read_manifest(manifest_path)
        if man.get("run_id") != self.run_id:
            raise StoreError(
                f"rank {self.rank}: {manifest_path} is run {man.get('run_id')!r}, not run {self.run_id!r} that rank 0 prepared; "
                "is the run directory on a filesystem that every rank shares, and written by this job only?"
            )
        diffs = _config_diff(man["config"], self.config, self._volatile)
        if man["total"] != self.total:
            diffs.insert(0, "total")
        if diffs:
            raise RunMismatchError(f"rank {self.rank}: its run differs from rank 0's in: {', '.join(diffs)} (every rank must load the same model, data and settings)")
        self._shards = list(man["shards"])
        self._base_files = {s.file for s in self._shards}
        self._created = str(man.get("created") or self._created)
        if self._shards:
            self._expect = self._shapes_of(self.run_dir / self._shards[0].file)

    def _absorb_fragments(self) -> list[Path]:
        """Coordinator: adopt the shards listed by this run's rank fragments. Returns every fragment
        file found (this run's and stale ones), to delete once manifest.json lists those shards."""
        ours, stale = _read_fragments(self.run_dir, self.run_id, self.total)
        for p in stale:
            logger.warning("ignoring %s: it belongs to another run", p)
        with self._lock:
            shards = self._shards
            for path, frag in ours:
                for s in frag["shards"]:
                    f = self.run_dir / s.file
                    if not f.is_file() or f.stat().st_size <= 0:
                        raise StoreError(f"{f}: listed in {path} but missing or empty; pass overwrite=True to start afresh")
                shards = _union(shards, frag["shards"], path)
            if pairs := _overlaps(shards):
                a, b = pairs[0]
                raise StoreError(f"{self.run_dir}: shards {a.file} [{a.start}, {a.stop}) and {b.file} [{b.start}, {b.stop}) overlap")
            added = len(shards) - len(self._shards)
            self._shards = shards
        if added:
            logger.info("merged %d shards from %d rank fragments into %s", added, len(ours), self.run_dir / MANIFEST_NAME)
        return [p for p, _ in ours] + stale

    def _discard_existing(self, manifest_path: Path) -> None:
        """overwrite=True: replace the manifest first (atomically, with an empty shard list), then
        delete the old shards, so a crash in between leaves orphans, never a dangling listing."""
        old_files: set[str] = set()
        try:
            old_files = {s.file for s in _read_manifest(manifest_path)["shards"]}
        except StoreError as exc:  # a corrupt manifest is exactly what overwrite is for
            logger.warning("overwriting an unreadable run: %s", exc)
        logger.info("overwrite=True: discarding the run in %s", self.run_dir)
        self._write_manifest()
        for name in old_files:
            (self.run_dir / name).unlink(missing_ok=True)
        # Shards of this prefix not in the old listing are deleted below, as orphans.

    def _resume_from(self, manifest_path: Path) -> None:
        man = _read_manifest(manifest_path)
        diffs = _config_diff(man["config"], self.config, self._volatile)
        if man["total"] != self.total:
            diffs.insert(0, "total")
        if diffs:
            raise RunMismatchError(
                f"{self.run_dir} holds a different run (differs in: {', '.join(diffs)}); "
                "pass overwrite=True to replace it, or choose another directory"
            )
        shards: list[_Shard] = man["shards"]
        for s in shards:
            path = self.run_dir / s.file
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise StoreError(f"{path}: listed in {manifest_path} but missing ({exc}); pass overwrite=True to start afresh") from exc
            if size <= 0:
                raise StoreError(f"{path}: listed in {manifest_path} but empty; pass overwrite=True to start afresh")
        if pairs := _overlaps(shards):
            a, b = pairs[0]
            raise StoreError(f"{manifest_path}: shards {a.file} and {b.file} overlap")
        self._shards = list(shards)
        self._status = man["status"]
        self._created = str(man.get("created") or self._created)
        self.run_id = man.get("run_id") if isinstance(man.get("run_id"), str) else None
        if shards:
            self._expect = self._shapes_of(self.run_dir / shards[0].file)
        logger.info("resuming %s: %d of %d samples already stored in %d shards", self.run_dir, sum(s.rows for s in shards), self.total, len(shards))

    def _shapes_of(self, path: Path) -> dict[str, Any]:
        """Shapes a resumed run's new blocks must match (from its first shard: metadata only)."""
        try:
            with h5py.File(path, "r") as f:
                return {
                    "attributions": {name: tuple(ds.shape[1:]) for name, ds in f["attributions"].items()},
                    "target": tuple(f["target"].shape[1:]),
                    "extras": {name: (tuple(ds.shape[1:]), ds.dtype.str) for name, ds in f.get("extras", {}).items()},
                }
        except Exception as exc:
            raise StoreError(f"{path}: cannot read the shard to resume ({exc})") from exc

    def _delete_orphans(self) -> None:
        """Finished shard files of this prefix that the manifest does not list: killed between the
        rename and the manifest update (or left by an overwritten run). Their rows are rewritten."""
        listed = {s.file for s in self._shards}
        pattern = re.compile(re.escape(self.shard_prefix) + r"-\d+\.h5")
        for p in self.run_dir.iterdir():
            if pattern.fullmatch(p.name) and p.name not in listed:
                logger.warning("deleting %s: not listed in the manifest, so not trusted", p)
                p.unlink(missing_ok=True)

    # -- manifest ----------------------------------------------------------------------------------

    def _write_manifest(self, status: str | None = None) -> None:
        with self._lock:
            if status is not None:
                self._status = status
            man = {
                "schema_version": SCHEMA_VERSION,
                "fastattr_version": _fastattr_version(),
                "status": self._status,
                "config": self.config,
                "total": self.total,
                "run_id": self.run_id,
                "created": self._created,
                "updated": _now(),
                "shards": [s.entry() for s in self._shards],
            }
            if self._fragment:  # only this rank's own shards; never "complete": rank 0 decides
                man.update(status="running", rank=self.rank, world_size=self.world_size)
                man["shards"] = [s.entry() for s in self._shards if s.file not in self._base_files]
        name = FRAGMENT_FORMAT.format(self.rank) if self._fragment else MANIFEST_NAME
        _write_json_atomic(self.run_dir / name, man)

    # -- public state ------------------------------------------------------------------------------

    @property
    def covered(self) -> list[tuple[int, int]]:
        """Merged, sorted [start, stop) ranges already finalized (listed in the manifest)."""
        with self._lock:
            return _merge((s.start, s.stop) for s in self._shards)

    def missing(self) -> list[tuple[int, int]]:
        """Sorted [start, stop) ranges of [0, total) not yet finalized."""
        return _complement(self.covered, self.total)

    @property
    def complete(self) -> bool:
        with self._lock:
            status = self._status
        return status == "complete" and not self.missing()

    @property
    def queue_maxsize(self) -> int:
        return self._queue.maxsize

    # -- caller side -------------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is not None:
            raise StoreError(f"the writer thread for {self.run_dir} failed: {type(err).__name__}: {err}") from err

    def put(self, block: Block, *, copy: bool = False) -> None:
        """Hand a block to the writer thread; blocks while the queue is full (backpressure).

        Raises ValueError for a malformed block (before anything is queued) and StoreError for an
        error the writer thread hit earlier. copy=True copies the arrays first, for callers that
        reuse their buffers."""
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"the writer for {self.run_dir} is closed")
        block = self._checked(block, copy=copy)
        if block.stop == block.start:
            return
        claimed_before = self._claimed
        self._claim(block.start, block.stop)
        try:
            self._enqueue(block)
        except BaseException:  # not queued (e.g. Ctrl-C while waiting): the samples are free again
            self._claimed = claimed_before
            raise
        self._raise_if_failed()

    def _checked(self, block: Block, *, copy: bool) -> Block:
        """Validate a block in the caller, so a bad one raises where it was made (not later, in
        the thread); returns it with numpy arrays."""
        if not isinstance(block, Block):
            raise TypeError(f"put() takes a Block, got {type(block).__name__}")
        try:
            start, stop = int(block.start), int(block.stop)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"block start/stop must be integers, got {block.start!r}, {block.stop!r}") from exc
        if not 0 <= start <= stop <= self.total:
            raise ValueError(f"block range [{start}, {stop}) is not inside [0, {self.total})")
        rows = stop - start

        def arr(name: str, value: Any, kinds: str, ndims: tuple[int, ...]) -> np.ndarray:
            a = np.array(value, copy=True) if copy else np.asarray(value)
            if a.ndim not in ndims or a.shape[0] != rows:
                raise ValueError(f"block field {name!r} has shape {a.shape}; expected {rows} rows for [{start}, {stop})" + (" and 1 dimension" if ndims == (1,) else ""))
            if a.dtype.kind not in kinds:
                raise ValueError(f"block field {name!r} has dtype {a.dtype}; expected kind {kinds!r}")
            return a

        if not isinstance(block.attributions, Mapping) or not block.attributions:
            raise ValueError("block field 'attributions' must be a non-empty dict name -> array")
        attributions: dict[str, np.ndarray] = {}
        for name, value in block.attributions.items():
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise ValueError(f"attribution name {name!r} is not a valid HDF5 dataset name (non-empty, no '/')")
            attributions[name] = arr(f"attributions/{name}", value, "fiu", tuple(range(1, 33)))
        if not isinstance(block.stats, Mapping) or set(block.stats) != set(STAT_KEYS):
            got = sorted(block.stats) if isinstance(block.stats, Mapping) else block.stats
            raise ValueError(f"block field 'stats' must have exactly the keys {STAT_KEYS}, got {got}")
        checked = Block(
            start=start,
            stop=stop,
            attributions=attributions,
            target=arr("target", block.target, "iu", (1, 2)),
            output=arr("output", block.output, "fiu", (1,)),
            baseline_output=arr("baseline_output", block.baseline_output, "fiu", (1,)),
            delta=arr("delta", block.delta, "fiu", (1,)),
            n_steps=arr("n_steps", block.n_steps, "iu", (1,)),
            stats={k: arr(f"stats/{k}", block.stats[k], "iu" if k == "nonfinite" else "fiu", (1,)) for k in STAT_KEYS},
            extras={},
        )
        if not isinstance(block.extras, Mapping):
            raise ValueError("block field 'extras' must be a dict name -> array")
        for name, value in block.extras.items():
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise ValueError(f"extra field name {name!r} is not a valid HDF5 dataset name (non-empty, no '/')")
            checked.extras[name] = arr(f"extras/{name}", value, "fiub", tuple(range(1, 33)))
        shapes = {
            "attributions": {name: tuple(a.shape[1:]) for name, a in attributions.items()},
            "target": tuple(checked.target.shape[1:]),
            "extras": {name: (tuple(a.shape[1:]), a.dtype.str) for name, a in checked.extras.items()},
        }
        if self._expect is None:
            self._expect = shapes
        elif shapes != self._expect:
            old, new = self._expect, shapes
            if set(old["attributions"]) != set(new["attributions"]):
                raise ValueError(f"block field 'attributions' has names {sorted(new['attributions'])}; this run stores {sorted(old['attributions'])}")
            for name, shape in new["attributions"].items():
                if shape != old["attributions"][name]:
                    raise ValueError(f"block field 'attributions/{name}' has feature shape {shape}; this run stores {old['attributions'][name]}")
            if new["extras"] != old["extras"]:
                raise ValueError(f"block field 'extras' has {new['extras']}; this run stores {old['extras']}")
            raise ValueError(f"block field 'target' has per-sample shape {new['target']}; this run stores {old['target']}")
        return checked

    def _claim(self, start: int, stop: int) -> None:
        """Refuse a block overlapping anything finalized or already queued: every sample once."""
        i = bisect_right(self._claimed, (start, math.inf))
        for a, b in self._claimed[max(i - 1, 0) : i + 1]:
            if a < stop and start < b:
                raise ValueError(f"block [{start}, {stop}) overlaps samples already written or queued ([{a}, {b}))")
        self._claimed = _merge([*self._claimed, (start, stop)])

    def _enqueue(self, item: Any) -> None:
        # A plain put() would wait forever if the thread were gone; poll so that cannot hang.
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_if_failed()
                    raise StoreError(f"the writer thread for {self.run_dir} has stopped") from None

    def close(self, *, complete: bool | None = None, merge_fragments: bool = True) -> None:
        """Write everything queued, finalize the open shard, stop the thread, and write the manifest
        with status "complete" if nothing is missing (or as given), else "running". A coordinator
        (rank 0) first merges the other ranks' fragments unless merge_fragments=False (after a
        failure, when other ranks may still be closing: the next open merges them instead).

        Re-raises (as StoreError) an error the writer thread hit; calling close() again is a no-op,
        or raises that error again."""
        if self._closed:
            self._raise_if_failed()
            return
        # The writer thread finalizes, writes the manifest and only then drops the directory
        # lock, so an interrupted close() can never let a second writer in while it still works.
        self._final_status = complete
        self._merge_on_close = merge_fragments
        self._enqueue(_CLOSE)
        self._thread.join()
        self._closed = True  # only once the thread is done: an interrupted close() can be retried
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without finalizing the open shard: its .partial stays (deleted on the next open).
        Finalized shards stay listed. Never raises the writer's error."""
        if self._closed:
            return
        self._aborting = True  # the thread now drops queued blocks instead of writing them
        try:
            self._enqueue(_ABORT)
        except StoreError:
            pass  # the thread is gone already (and has released the lock)
        self._thread.join()
        self._closed = True

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.run_dir)!r}, total={self.total}, covered={self.covered})"

    # -- writer thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                try:
                    if item is _CLOSE or item is _ABORT:
                        if item is _CLOSE and self._error is None and not self._aborting:
                            self._finalize_open()
                            self._write_final_manifest()
                        else:
                            self._abandon_open()
                        return
                    if self._error is not None or self._aborting:
                        continue  # a failed or aborting writer drops blocks (callers see the error)
                    self._write_block(item)
                except Exception as exc:
                    logger.error("writer thread for %s failed: %s: %s", self.run_dir, type(exc).__name__, exc)
                    self._error = exc
                    self._abandon_open()
                    if item is _CLOSE or item is _ABORT:
                        return
                finally:
                    self._queue.task_done()
        finally:
            self._release_lock()  # the thread owns the directory until its last write is done

    def _write_final_manifest(self) -> None:
        if self._fragment:
            if any(s.file not in self._base_files for s in self._shards):  # else no fragment to leave behind
                self._write_manifest()
            return
        found = self._absorb_fragments() if self._merge_on_close else []  # the other ranks closed first
        missing = self.missing()
        complete = not missing if self._final_status is None else self._final_status
        if complete and missing:
            logger.warning("closing %s as complete although %s are missing", self.run_dir, _fmt_ranges(missing))
        try:
            self._write_manifest("complete" if complete else "running")
        except OSError as exc:
            raise StoreError(f"cannot write {self.run_dir / MANIFEST_NAME}: {exc}") from exc
        for p in found:  # listed in manifest.json now
            p.unlink(missing_ok=True)

    def _write_block(self, block: Block) -> None:
        pos = block.start
        while pos < block.stop:
            if self._open is not None and self._open.stop != pos:
                self._finalize_open()  # shards hold contiguous indices only
            if self._open is None:
                self._open = self._new_shard(pos, block)
            n = min(block.stop - pos, self.shard_rows - self._open.rows)
            lo = pos - block.start
            self._append(self._open, block, lo, lo + n)
            pos += n
            if self._open.rows >= self.shard_rows:
                self._finalize_open()
        if self._open is not None and self.max_shard_seconds is not None and time.monotonic() - self._open.opened >= self.max_shard_seconds:
            self._finalize_open()

    def _chunk_rows(self, feature_shape: tuple[int, ...]) -> int:
        row_bytes = max(1, math.prod(feature_shape) * self.storage_dtype.itemsize)
        return max(1, min(self.shard_rows, CHUNK_TARGET_BYTES // row_bytes))

    def _new_shard(self, start: int, block: Block) -> _OpenShard:
        shard_id = self._next_id
        self._next_id += self.world_size  # each rank its own residue class: names never collide
        name = f"{self.shard_prefix}-{shard_id:05d}.h5"
        shard = _OpenShard(self.run_dir / (name + PARTIAL_SUFFIX), shard_id, start)
        # A chunk cache larger than the largest chunk (1 MiB) keeps a block's trailing partial
        # chunk in memory until the next block completes it, instead of recompressing it twice.
        f = h5py.File(shard.path, "w", rdcc_nbytes=WRITE_CHUNK_CACHE_BYTES)
        shard.file = f
        comp: dict[str, Any] = {}
        if self.compression == "lzf":
            comp = {"compression": "lzf"}
        elif self.compression == "gzip":
            comp = {"compression": "gzip", "compression_opts": GZIP_LEVEL}
        scalar_chunk = min(self.shard_rows, SCALAR_CHUNK_ROWS)

        # Datasets start empty and grow block by block (resizable along rows), so the .partial
        # never holds unwritten rows and finalize only has to stamp attributes.
        def make(group: h5py.Group, name: str, dtype: Any, tail: tuple[int, ...], chunk_rows: int) -> None:
            group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk_rows, *tail), **comp)

        attributions = f.create_group("attributions", track_order=True)  # keep the caller's name order
        for name, a in block.attributions.items():
            make(attributions, name, self.storage_dtype, a.shape[1:], self._chunk_rows(a.shape[1:]))
        make(f, "index", np.int64, (), scalar_chunk)
        make(f, "target", np.int64, block.target.shape[1:], scalar_chunk)
        for name, dtype in SCALAR_DTYPES.items():
            make(f, name, dtype, (), scalar_chunk)
        stats = f.create_group("stats", track_order=True)
        for name, dtype in STAT_DTYPES.items():
            make(stats, name, dtype, (), scalar_chunk)
        if block.extras:
            extras = f.create_group("extras", track_order=True)
            for name, a in block.extras.items():
                make(extras, name, a.dtype, a.shape[1:], scalar_chunk)
        logger.debug("opened %s at index %d", shard.path.name, start)
        return shard

    def _to_storage(self, a: np.ndarray) -> np.ndarray:
        if a.dtype == self.storage_dtype:
            return a
        # float16 tops out at 65504: say so once rather than silently storing inf.
        with np.errstate(over="raise"):
            try:
                return a.astype(self.storage_dtype)
            except FloatingPointError:
                pass
        if not self._overflow_warned:
            self._overflow_warned = True
            logger.warning("attributions exceed the %s range and are stored as inf (use storage_dtype='float32')", self.storage_dtype)
        with np.errstate(over="ignore"):
            return a.astype(self.storage_dtype)

    def _append(self, shard: _OpenShard, block: Block, lo: int, hi: int) -> None:
        """Append block rows [lo, hi) to the open shard: one resize + one write per dataset."""
        f = shard.file
        assert f is not None
        r0, r1 = shard.rows, shard.rows + (hi - lo)

        def write(ds: h5py.Dataset, data: np.ndarray) -> None:
            if ds.shape[1:] != data.shape[1:]:
                raise ValueError(f"{shard.path}: dataset {ds.name} has rows of shape {ds.shape[1:]}, block has {data.shape[1:]}")
            ds.resize(r1, axis=0)
            ds[r0:r1] = data

        group = f["attributions"]
        if set(group) != set(block.attributions):
            raise ValueError(f"{shard.path}: attribution names {sorted(block.attributions)} differ from the shard's {sorted(group)}")
        for name, a in block.attributions.items():
            write(group[name], self._to_storage(a[lo:hi]))
        write(f["index"], np.arange(block.start + lo, block.start + hi, dtype=np.int64))
        write(f["target"], block.target[lo:hi].astype(np.int64, copy=False))
        for name, dtype in SCALAR_DTYPES.items():
            write(f[name], getattr(block, name)[lo:hi].astype(dtype, copy=False))
        for name, dtype in STAT_DTYPES.items():
            write(f["stats"][name], block.stats[name][lo:hi].astype(dtype, copy=False))
        if set(f.get("extras", {})) != set(block.extras):
            raise ValueError(f"{shard.path}: extra fields {sorted(block.extras)} differ from the shard's {sorted(f.get('extras', {}))}")
        for name, a in block.extras.items():
            write(f["extras"][name], a[lo:hi])
        shard.rows = r1

    def _finalize_open(self) -> None:
        """Make the open shard durable, then (and only then) list it in the manifest."""
        shard, self._open = self._open, None
        if shard is None or shard.file is None:
            return
        if shard.rows == 0:  # nothing was written (cannot normally happen): just drop it
            shard.close_quietly()
            shard.path.unlink(missing_ok=True)
            return
        f = shard.file
        try:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["method"] = self._method
            f.attrs["config_json"] = self._config_json
            f.attrs["shard_id"] = shard.shard_id
            f.attrs["start"] = shard.start
            f.attrs["stop"] = shard.stop
            f.close()
        finally:
            shard.close_quietly()
        _fsync_path(shard.path)  # the data must be on disk before the name says "finished"
        final = shard.path.with_name(shard.path.name[: -len(PARTIAL_SUFFIX)])
        os.replace(shard.path, final)
        _fsync_dir(self.run_dir)
        # Hash what is on disk, after the rename: the checksum covers the exact bytes listed.
        entry = _Shard(final.name, shard.start, shard.stop, shard.rows, _sha256(final))
        # Held across the manifest write, so `covered` never runs ahead of what is on disk.
        with self._lock:
            self._shards.append(entry)
            self._shards.sort(key=lambda s: s.start)
            status_before, self._status = self._status, "running"
            try:
                self._write_manifest()
            except BaseException:  # not listed on disk, so not covered: the next open deletes the orphan
                self._shards.remove(entry)
                self._status = status_before
                raise
        logger.debug("finalized %s [%d, %d)", final.name, shard.start, shard.stop)

    def _abandon_open(self) -> None:
        shard, self._open = self._open, None
        if shard is not None:
            shard.close_quietly()  # the .partial stays and is deleted on the next open


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def open_run(run_dir: str | os.PathLike[str], *, max_open_files: int = 64) -> RunReader:
    """Open a run directory for reading (see RunReader)."""
    return RunReader(run_dir, max_open_files=max_open_files)


class RunReader:
    """Lazy, read-only view of a run's finalized shards, indexed by global sample index.

    ``reader[i]`` -> one sample's fields; ``reader[a:b]`` -> the same fields stacked (missing
    indices raise KeyError); ``field("stats/l1")`` -> one per-sample field for every stored sample;
    ``iter_batches()`` -> shard-by-shard batches in constant memory. Works on a run in progress
    (a snapshot of its manifest at open). Close it (or use ``with``) to release file handles.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, max_open_files: int = 64) -> None:
        self.run_dir = Path(run_dir)
        man = _read_listing(self.run_dir)  # manifest.json plus unmerged rank fragments
        self._manifest = man
        self._shards: list[_Shard] = man["shards"]
        self.total: int = man["total"]
        if pairs := _overlaps(self._shards):
            a, b = pairs[0]
            raise StoreError(f"{self.run_dir / MANIFEST_NAME}: shards {a.file} [{a.start}, {a.stop}) and {b.file} [{b.start}, {b.stop}) overlap")
        self._names: list[str] = []
        for i, s in enumerate(self._shards):
            path = self.run_dir / s.file
            if not path.is_file():
                raise StoreError(f"{path}: listed in the manifest but missing")
            try:
                with h5py.File(path, "r") as f:
                    _check_shard_file(f, s)
                    names = list(f["attributions"])
            except StoreError:
                raise
            except Exception as exc:  # truncated / not HDF5 / unreadable
                raise StoreError(f"{path}: cannot open the shard ({type(exc).__name__}: {exc})") from exc
            if i == 0:
                self._names = names
            elif set(names) != set(self._names):
                raise StoreError(f"{path}: attributions {sorted(names)} differ from the first shard's {sorted(self._names)}")
        self._starts = [s.start for s in self._shards]
        self._end = self._shards[-1].stop if self._shards else 0  # end of the stored range
        self._files: OrderedDict[str, h5py.File] = OrderedDict()  # LRU of open handles
        self._max_open = max(1, int(max_open_files))

    # -- metadata ------------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """The run's config plus status, total, shards (and schema/version/timestamps)."""
        m = self._manifest
        meta = json.loads(json.dumps(m["config"]))  # a copy the caller may modify
        meta.update(
            status=m["status"],
            total=m["total"],
            shards=[s.entry() for s in self._shards],
            schema_version=m["schema_version"],
            fastattr_version=m.get("fastattr_version"),
            created=m.get("created"),
            updated=m.get("updated"),
        )
        return meta

    @property
    def status(self) -> str:
        return self._manifest["status"]

    @property
    def attribution_names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return sum(s.rows for s in self._shards)

    @property
    def indices(self) -> np.ndarray:
        """Sorted global indices of the stored samples."""
        if not self._shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(s.start, s.stop, dtype=np.int64) for s in self._shards])

    def __repr__(self) -> str:
        return f"RunReader({str(self.run_dir)!r}, samples={len(self)}, total={self.total}, status={self.status!r})"

    # -- file handles ----------------------------------------------------------------------------

    def _file(self, shard: _Shard) -> h5py.File:
        f = self._files.get(shard.file)
        if f is not None:
            self._files.move_to_end(shard.file)
            return f
        path = self.run_dir / shard.file
        try:
            f = h5py.File(path, "r")
        except Exception as exc:
            raise StoreError(f"{path}: cannot open the shard ({type(exc).__name__}: {exc})") from exc
        self._files[shard.file] = f
        while len(self._files) > self._max_open:
            _, old = self._files.popitem(last=False)
            old.close()
        return f

    def close(self) -> None:
        while self._files:
            _, f = self._files.popitem()
            f.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def _read(self, shard: _Shard, lo: int, hi: int, step: int = 1) -> dict[str, Any]:
        """Rows [lo:hi:step] (shard-local) of every dataset."""
        f = self._file(shard)
        sl = slice(lo, hi, step)
        try:
            return {
                "attributions": {name: f["attributions"][name][sl] for name in self._names},
                "target": f["target"][sl],
                "output": f["output"][sl],
                "baseline_output": f["baseline_output"][sl],
                "delta": f["delta"][sl],
                "n_steps": f["n_steps"][sl],
                "stats": {k: f["stats"][k][sl] for k in STAT_KEYS},
                "extras": {name: ds[sl] for name, ds in f["extras"].items()} if "extras" in f else {},
                "index": f["index"][sl],
            }
        except Exception as exc:
            raise StoreError(f"{self.run_dir / shard.file}: cannot read rows [{lo}, {hi}) ({type(exc).__name__}: {exc})") from exc

    @staticmethod
    def _stack(parts: list[dict[str, Any]]) -> dict[str, Any]:
        if len(parts) == 1:
            return parts[0]
        out: dict[str, Any] = {}
        for key, value in parts[0].items():
            if isinstance(value, dict):
                out[key] = {k: np.concatenate([p[key][k] for p in parts]) for k in value}
            else:
                out[key] = np.concatenate([p[key] for p in parts])
        return out

    def _locate(self, index: int) -> _Shard | None:
        i = bisect_right(self._starts, index) - 1
        if i >= 0 and index < self._shards[i].stop:
            return self._shards[i]
        return None

    def __getitem__(self, key: int | slice) -> dict[str, Any]:
        if isinstance(key, slice):
            return self._get_slice(key)
        try:
            index = int(key.__index__())  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            raise TypeError(f"index a run with an int or a slice of global sample indices, got {type(key).__name__}") from None
        if index < 0:
            index += self._end  # negative counts from the end of the stored range
        if not 0 <= index < self.total:
            raise IndexError(f"sample index {key} is outside [0, {self.total})")
        shard = self._locate(index)
        if shard is None:
            raise KeyError(f"sample {index} is not stored in {self.run_dir} (run status {self.status!r})")
        rows = self._read(shard, index - shard.start, index - shard.start + 1)
        one = {k: ({n: a[0] for n, a in v.items()} if isinstance(v, dict) else v[0]) for k, v in rows.items()}
        one["index"] = int(one["index"])
        return one

    def _bound(self, value: int | None, default: int) -> int:
        if value is None:
            return default
        value = int(value.__index__())
        if value < 0:
            value += self._end
        return min(max(value, 0), self.total)

    def _get_slice(self, key: slice) -> dict[str, Any]:
        step = 1 if key.step is None else int(key.step.__index__())
        if step <= 0:
            raise ValueError("slices of a run need a positive step")
        # An open stop means the end of what is stored; an explicit one may reach up to total,
        # so asking for samples not yet written raises KeyError instead of returning fewer.
        start, stop = self._bound(key.start, 0), self._bound(key.stop, self._end)
        wanted = range(start, max(start, stop), step)
        parts: list[dict[str, Any]] = []
        found = 0
        i = max(bisect_right(self._starts, start) - 1, 0)
        for shard in self._shards[i:]:
            if shard.start >= wanted.stop:
                break
            first = wanted.start if wanted.start >= shard.start else wanted.start + -(-(shard.start - wanted.start) // step) * step
            last = min(wanted.stop, shard.stop)
            if first >= last:
                continue
            parts.append(self._read(shard, first - shard.start, last - shard.start, step))
            found += len(range(first, last, step))
        if found != len(wanted):
            idx = np.arange(wanted.start, wanted.stop, step, dtype=np.int64)
            stored = np.zeros(idx.shape, dtype=bool)
            for s in self._shards:
                stored |= (idx >= s.start) & (idx < s.stop)
            raise KeyError(f"samples not stored in {self.run_dir}: {_fmt_ranges(_runs(idx[~stored]))} (run status {self.status!r})")
        if not parts:
            return self._empty()
        return self._stack(parts)

    def _empty(self) -> dict[str, Any]:
        if self._shards:
            return self._read(self._shards[0], 0, 0)
        f32, i32, i64 = np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64)
        return {
            "attributions": {},
            "target": i64,
            "output": f32,
            "baseline_output": f32.copy(),
            "delta": f32.copy(),
            "n_steps": i32,
            "stats": {k: (i32.copy() if k == "nonfinite" else f32.copy()) for k in STAT_KEYS},
            "extras": {},
            "index": i64.copy(),
        }

    def field(self, name: str) -> np.ndarray:
        """One dataset ("delta", "output", "target", "stats/l1", "index", ...) for every stored
        sample, in global order."""
        name = name.strip("/")
        parts = []
        for s in self._shards:
            f = self._file(s)
            if name not in f or not isinstance(f[name], h5py.Dataset):
                known = ["index", "target", *SCALAR_DTYPES, *(f"stats/{k}" for k in STAT_KEYS)]
                raise KeyError(f"no field {name!r} in {self.run_dir / s.file}; fields: {', '.join(known)}")
            parts.append(f[name][()])
        if not parts:
            return np.zeros(0, dtype=np.int32 if name in ("n_steps", "stats/nonfinite") else np.int64 if name in ("index", "target") else np.float32)
        return np.concatenate(parts)

    def iter_batches(self, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
        """Batches (dicts like a slice's) of at most batch_size samples, shard by shard in global
        order; a batch never spans two shards, so memory stays at one batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for s in self._shards:
            for lo in range(0, s.rows, batch_size):
                yield self._read(s, lo, min(lo + batch_size, s.rows))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One sample dict at a time (read in batches)."""
        for batch in self.iter_batches():
            for j in range(len(batch["index"])):
                yield {k: ({n: a[j] for n, a in v.items()} if isinstance(v, dict) else v[j]) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """verify_run's findings. ok means no problem (integrity: checksums, structure, coverage);
    warnings (non-finite attributions, an unfinished run's missing ranges, stray files) do not
    make a run invalid."""

    ok: bool
    problems: list[str]
    samples: int
    total: int
    status: str = ""
    shards: int = 0
    nonfinite: int = 0  # sum of stats/nonfinite over stored samples
    max_abs_delta: float = math.nan  # over samples with a defined delta
    median_abs_delta: float = math.nan
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        out = [
            f"{head}: {self.samples} of {self.total} samples in {self.shards} shards, status {self.status or '?'}",
            f"non-finite attribution values: {self.nonfinite}",
            f"|delta|: max {self.max_abs_delta:.4g}, median {self.median_abs_delta:.4g}",
        ]
        out += [f"problem: {p}" for p in self.problems]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def verify_run(run_dir: str | os.PathLike[str]) -> VerifyReport:
    """Check a run directory thoroughly (reads every shard in full): manifest schema, each shard's
    sha256 and structure, coverage (no duplicates; every index once for a complete run),
    non-finite counts and residual statistics. Never raises for a damaged run: it reports."""
    d = Path(run_dir)
    try:
        man = _read_listing(d)
    except StoreError as exc:
        return VerifyReport(ok=False, problems=[str(exc)], samples=0, total=0)
    shards: list[_Shard] = man["shards"]
    total, status = man["total"], man["status"]
    problems: list[str] = []
    warnings: list[str] = []
    nonfinite = 0
    deltas: list[np.ndarray] = []
    for s in shards:
        path = d / s.file
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
            continue
        digest = _sha256(path)
        if digest != s.sha256:
            problems.append(f"{path}: checksum mismatch (manifest {s.sha256[:12]}..., file {digest[:12]}...)")
            continue
        try:
            with h5py.File(path, "r") as f:
                _check_shard_file(f, s)
                if not np.array_equal(f["index"][()], np.arange(s.start, s.stop)):
                    problems.append(f"{path}: 'index' is not {s.start}..{s.stop - 1}")
                nonfinite += int(f["stats/nonfinite"][()].astype(np.int64).sum())
                deltas.append(np.abs(f["delta"][()].astype(np.float64)))
        except StoreError as exc:
            problems.append(str(exc))
        except Exception as exc:
            problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
    for a, b in _overlaps(shards):
        problems.append(f"duplicate samples [{b.start}, {min(a.stop, b.stop)}) in {a.file} and {b.file}")
    missing = _complement([(s.start, s.stop) for s in shards], total)
    if missing:
        text = f"{sum(b - a for a, b in missing)} samples not stored: {_fmt_ranges(missing)}"
        (problems if status == "complete" else warnings).append(text)
    if nonfinite:
        warnings.append(f"{nonfinite} non-finite attribution values")
    if man["fragments"]:
        warnings.append(f"{len(man['fragments'])} rank fragments not merged into {MANIFEST_NAME} yet (a distributed run that stopped early; resuming merges them)")
    listed = {s.file for s in shards}
    for p in sorted(d.iterdir()):
        if p.name.endswith(PARTIAL_SUFFIX) or (p.suffix == ".h5" and p.name not in listed):
            warnings.append(f"{p.name}: not listed in the manifest (unfinished or orphaned; ignored)")
    all_d = np.concatenate(deltas) if deltas else np.zeros(0)
    all_d = all_d[np.isfinite(all_d)]
    return VerifyReport(
        ok=not problems,
        problems=problems,
        samples=sum(s.rows for s in shards),
        total=total,
        status=status,
        shards=len(shards),
        nonfinite=nonfinite,
        max_abs_delta=float(all_d.max()) if all_d.size else math.nan,
        median_abs_delta=float(np.median(all_d)) if all_d.size else math.nan,
        warnings=warnings,
    )
