"""One shard file: creating it as ``.fastattr-<name>.partial``, appending block rows, finalizing
it in two steps (``seal``: stamp, flush, close; ``SealedShard.commit``: fsync, rename, fsync the directory,
sha256), and its marker.

A shard holds contiguous global indices [start, stop); its datasets start empty and grow block by
block, so the .partial never holds unwritten rows and finalizing only has to stamp attributes.

The marker (schema 2) is the shard's 512-byte HDF5 user block, which HDF5 reserves and never
touches: magic, run id, shard id, start and the rows written so far (updated after every append,
not fsynced). It proves a file is fastattr's without trusting its HDF5 content (a shard killed
before close is unreadable) and lets ``fastattr info`` show the rows of a shard in progress.

A write that fails (disk full, quota, the file-size limit of ``ulimit -f``) leaves HDF5 holding
chunks and metadata it could not write; closing such a file makes h5py 3.16 / HDF5 2.0 retry those
writes and crash (a segfault in ``File.close``). So a shard never closes a file after a failed write:
``OpenShard.drop`` points the file's descriptor at the null device first, closes (the writes now
succeed and go nowhere) and deletes the .partial. Finalizing flushes before closing, so a write
failure surfaces there, as an exception, and never inside close. Space errors become a
``DiskFullError`` saying what to do (tests/test_crash.py sweeps the failure point).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DiskFullError, StoreError
from . import fsutil
from .block import Block
from .encode import ChunkBuffer, deflate_ratio, workers
from .manifest import ShardEntry
from .ranges import format_ranges, value_runs
from .schema import (
    AUTO_MIN_RATIO,
    AUTO_PROBE_BYTES,
    CHUNK_TARGET_BYTES,
    GZIP_LEVEL,
    MARKER_FORMAT,
    MARKER_MAGIC,
    MARKER_ROWS_OFFSET,
    OWN_PREFIX,
    PARTIAL_SUFFIX,
    POOL_CHECKSUM_MIN_THREADS,
    SCALAR_CHUNK_ROWS,
    SCALAR_DTYPES,
    SCHEMA_VERSION,
    SHARD_LIBVER,
    STAT_DTYPES,
    USERBLOCK_SIZE,
    WRITE_CHUNK_CACHE_BYTES,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    """What a shard's user block says (schema 2): whose it is and how far it got."""

    run_id: str
    shard_id: int
    start: int
    rows: int


def partial_name(final_name: str) -> str:
    """The name a shard has while it is written: in fastattr's own namespace, so it is provably
    fastattr's to delete and can never be a user's file."""
    return OWN_PREFIX + final_name + PARTIAL_SUFFIX


def read_marker(path: Path) -> Marker | None:
    """The marker of a schema-2 shard (finished or not); None for any other file."""
    try:
        with open(path, "rb") as f:
            head = f.read(struct.calcsize(MARKER_FORMAT))
    except OSError:
        return None
    if len(head) < struct.calcsize(MARKER_FORMAT) or not head.startswith(MARKER_MAGIC):
        return None
    _, run_id, shard_id, start, rows = struct.unpack(MARKER_FORMAT, head)
    return Marker(run_id.decode("ascii", "replace").rstrip("\0"), shard_id, start, rows)


def nonfinite_rows(a: np.ndarray) -> np.ndarray:
    """Per row (axis 0), the number of non-finite values (int64)."""
    finite = np.isfinite(a)
    if finite.all():
        return np.zeros(a.shape[0], dtype=np.int64)
    return (~finite).reshape(a.shape[0], -1).sum(1, dtype=np.int64)


class ShardLayout:
    """How one writer lays out its shards: storage dtype, compression, rows per shard, and the
    run id its markers carry (set once the run directory is open). Also casts attributions to the
    storage dtype, warning once per writer when values overflow it."""

    def __init__(self, storage_dtype: str, compression: str, shard_rows: int) -> None:
        self.storage_dtype = np.dtype(storage_dtype)
        self.compression = compression
        self.shard_rows = shard_rows
        self.run_id = ""
        self._overflow_warned = False

    def choose(self, block: Block) -> str:
        """The compression of a new shard: as configured, or for "auto" "gzip" when shuffle + deflate
        shrinks a sample of the block's attributions (in the storage dtype) at least AUTO_MIN_RATIO
        times, else "none". gzip shards are encoded in the thread pool (store/encode.py)."""
        if self.compression != "auto":
            return self.compression
        budget = AUTO_PROBE_BYTES // max(1, len(block.attributions))
        with np.errstate(over="ignore", invalid="ignore"):
            ratios = [deflate_ratio(a[: min(len(a), 64)].astype(self.storage_dtype, copy=False), GZIP_LEVEL, budget) for a in block.attributions.values()]
        return "gzip" if ratios and min(ratios) >= AUTO_MIN_RATIO else "none"

    def chunk_rows(self, feature_shape: tuple[int, ...]) -> int:
        row_bytes = max(1, math.prod(feature_shape) * self.storage_dtype.itemsize)
        return max(1, min(self.shard_rows, CHUNK_TARGET_BYTES // row_bytes))

    def to_storage(self, a: np.ndarray, first_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """a (rows of samples first_index, ...) cast to the storage dtype, and per row the number
        of non-finite values a holds and the number the cast added (float16 tops out at 65504:
        larger values become inf)."""
        given = nonfinite_rows(a) if a.dtype.kind == "f" else np.zeros(a.shape[0], dtype=np.int64)
        if a.dtype == self.storage_dtype:
            return a, given, np.zeros_like(given)
        with np.errstate(over="ignore", invalid="ignore"):
            stored = a.astype(self.storage_dtype)
        made = nonfinite_rows(stored) - given
        if made.any() and not self._overflow_warned:
            self._overflow_warned = True  # once per writer; verify lists every affected sample
            bad = first_index + np.flatnonzero(made)
            logger.warning(
                "samples %s: attribution values beyond the %s range are stored as inf and counted in stats/nonfinite "
                "(fastattr verify fails on them); use storage_dtype='float32' to keep them",
                format_ranges(value_runs(bad)), self.storage_dtype,
            )  # fmt: skip
        return stored, given, made

    def stored_rows(self, block: Block, lo: int, hi: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Block rows [lo, hi) of every attribution in the storage dtype, and stats/nonfinite as it
        must be stored: it counts what the shard holds, so at least the non-finite values of the
        stored attributions (whatever the caller counted: callers may count non-finite outputs
        too), plus every value the cast to the storage dtype made non-finite."""
        given = block.stats["nonfinite"][lo:hi].astype(np.int64)
        seen = np.zeros(hi - lo, dtype=np.int64)
        made = np.zeros(hi - lo, dtype=np.int64)
        stored: dict[str, np.ndarray] = {}
        for name, a in block.attributions.items():
            stored[name], had, added = self.to_storage(a[lo:hi], block.start + lo)
            seen += had
            made += added
        return stored, np.maximum(given, seen) + made

    def create(self, run_dir: Path, final_name: str, shard_id: int, start: int, block: Block) -> OpenShard:
        """A new empty shard file, named partial_name(final_name) until finished, with the
        datasets of block's fields and the marker in its user block."""
        shard = OpenShard(run_dir / partial_name(final_name), final_name, shard_id, start, self)
        shard.compression = self.choose(block)
        # A chunk cache larger than the largest chunk (1 MiB) keeps a block's trailing partial
        # chunk in memory until the next block completes it, instead of recompressing it twice
        # (the datasets stay open between blocks for that: see OpenShard.bind).
        try:
            f = h5py.File(shard.path, "w", rdcc_nbytes=WRITE_CHUNK_CACHE_BYTES, libver=SHARD_LIBVER, userblock_size=USERBLOCK_SIZE)
        except Exception as exc:
            raise write_error(exc, shard.path) from exc
        shard.file = f
        try:
            shard.open_marker()
            self._create_datasets(f, block, shard.compression)
            shard.bind()
        except BaseException as exc:
            shard.drop()
            if isinstance(exc, Exception):
                raise write_error(exc, shard.path) from exc
            raise
        logger.debug("opened %s at index %d (compression %s)", shard.path.name, start, shard.compression)
        return shard

    def _create_datasets(self, f: h5py.File, block: Block, compression: str) -> None:
        comp: dict[str, Any] = {"fletcher32": True}  # per-chunk checksums, checked by every HDF5 read
        if compression == "lzf":
            comp.update(compression="lzf")
        elif compression == "gzip":
            comp.update(compression="gzip", compression_opts=GZIP_LEVEL)
        scalar_chunk = min(self.shard_rows, SCALAR_CHUNK_ROWS)

        # Datasets start empty and grow block by block (resizable along rows).
        def make(group: h5py.Group, name: str, dtype: Any, tail: tuple[int, ...], chunk_rows: int) -> None:
            group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk_rows, *tail), **comp)

        attributions = f.create_group("attributions", track_order=True)  # keep the caller's name order
        if compression == "gzip":  # exactly the pipeline store/encode.py emulates: shuffle, deflate, fletcher32
            comp["shuffle"] = True
        for name, a in block.attributions.items():
            make(attributions, name, self.storage_dtype, a.shape[1:], self.chunk_rows(a.shape[1:]))
        comp.pop("shuffle", None)
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


class OpenShard:
    """The shard being written: an h5py file named *.partial holding contiguous rows from start."""

    def __init__(self, path: Path, final_name: str, shard_id: int, start: int, layout: ShardLayout) -> None:
        self.path = path  # the .partial path
        self.final_name = final_name
        self.shard_id = shard_id
        self.start = start
        self.layout = layout
        self.rows = 0
        self.opened = time.monotonic()
        self.file: h5py.File | None = None
        self.datasets: dict[str, h5py.Dataset] = {}  # "index", "attributions/x", "stats/l1", ...
        self._marker_fd: int | None = None
        self._buffers: dict[str, ChunkBuffer] = {}  # parallel encoding: per attribution dataset
        self.compression = layout.compression  # this shard's (ShardLayout.choose settles "auto")

    @property
    def stop(self) -> int:
        return self.start + self.rows

    def open_marker(self) -> None:
        """Write the marker into the user block (HDF5 reserves it and never writes there)."""
        self._marker_fd = os.open(self.path, os.O_WRONLY)
        run_id = self.layout.run_id.encode("ascii")[:32]
        os.pwrite(self._marker_fd, struct.pack(MARKER_FORMAT, MARKER_MAGIC, run_id, self.shard_id, self.start, 0), 0)

    def _mark_rows(self) -> None:
        if self._marker_fd is not None:
            os.pwrite(self._marker_fd, struct.pack("<q", self.rows), MARKER_ROWS_OFFSET)

    def _close_marker(self) -> None:
        if self._marker_fd is not None:
            os.close(self._marker_fd)
            self._marker_fd = None

    def bind(self) -> None:
        """Hold every dataset open until the file closes. A dataset whose last handle goes away is
        closed and flushes its chunk cache there and then: that would recompress a block's trailing
        partial chunk once per block, and a write failing in a handle's deallocation is only
        printed by h5py, never raised."""
        f = self.file
        assert f is not None
        found: dict[str, h5py.Dataset] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                found[name] = obj

        f.visititems(visit)
        self.datasets = found
        # chunks encoded in the pool, written with write_direct_chunk: always for gzip; for none (raw
        # bytes + fletcher32, HDF5's one filter) where the pool has the cores to beat HDF5's C checksum
        pooled = self.compression == "gzip" or (self.compression == "none" and workers() >= POOL_CHECKSUM_MIN_THREADS)
        if pooled:
            level = GZIP_LEVEL if self.compression == "gzip" else None
            self._buffers = {k: ChunkBuffer(ds.chunks[0], level) for k, ds in found.items() if k.startswith("attributions/")}

    def _group_names(self, group: str) -> set[str]:
        prefix = group + "/"
        return {k[len(prefix) :] for k in self.datasets if k.startswith(prefix)}

    def append(self, block: Block, lo: int, hi: int) -> None:
        """Append block rows [lo, hi): one resize + one write per dataset. A write that fails drops
        the file (see the module docstring) and raises StoreError (DiskFullError for lack of space)."""
        if set(block.attributions) != self._group_names("attributions"):
            raise ValueError(f"{self.path}: attribution names {sorted(block.attributions)} differ from the shard's {sorted(self._group_names('attributions'))}")
        if set(block.extras) != self._group_names("extras"):
            raise ValueError(f"{self.path}: extra fields {sorted(block.extras)} differ from the shard's {sorted(self._group_names('extras'))}")
        r0, r1 = self.rows, self.rows + (hi - lo)
        stored, nonfinite = self.layout.stored_rows(block, lo, hi)  # nonfinite counted after the cast
        rows: dict[str, np.ndarray] = {f"attributions/{name}": a for name, a in stored.items()}
        rows["index"] = np.arange(block.start + lo, block.start + hi, dtype=np.int64)
        rows["target"] = block.target[lo:hi].astype(np.int64, copy=False)
        for name, dtype in SCALAR_DTYPES.items():
            rows[name] = getattr(block, name)[lo:hi].astype(dtype, copy=False)
        for name, dtype in STAT_DTYPES.items():
            data = nonfinite if name == "nonfinite" else block.stats[name][lo:hi]
            rows[f"stats/{name}"] = data.astype(dtype, copy=False)
        for name, a in block.extras.items():
            rows[f"extras/{name}"] = a[lo:hi]
        for key, data in rows.items():
            ds = self.datasets[key]
            if ds.shape[1:] != data.shape[1:]:
                raise ValueError(f"{self.path}: dataset {ds.name} has rows of shape {ds.shape[1:]}, block has {data.shape[1:]}")
        try:
            # parallel encoding: whole chunks go to the pool first, scalars are written meanwhile
            jobs = [(self.datasets[k], job) for k in self._buffers for job in self._buffers[k].add(rows.pop(k))]
            for key in self._buffers:
                self.datasets[key].resize(r1, axis=0)
            for key, data in rows.items():
                ds = self.datasets[key]
                ds.resize(r1, axis=0)
                ds[r0:r1] = data
            _write_chunks(jobs)
        except Exception as exc:  # h5py raises OSError or RuntimeError for a failed write
            self.drop()
            raise write_error(exc, self.path) from exc
        self.rows = r1
        self._mark_rows()

    def seal(self, *, method: str, config_json: str) -> SealedShard:
        """Stamp the attributes, flush and close: the part that needs h5py (the writer thread's).
        What is left (fsync, rename, hash) needs no h5py and may run in another thread while the
        writer fills the next shard (store/writer.py). A failure drops the .partial and raises
        StoreError (DiskFullError for lack of space)."""
        f = self.file
        assert f is not None
        try:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["run_id"] = self.layout.run_id
            f.attrs["method"] = method
            f.attrs["config_json"] = config_json
            f.attrs["shard_id"] = self.shard_id
            f.attrs["start"] = self.start
            f.attrs["stop"] = self.stop
            _write_chunks([(self.datasets[k], job) for k, buf in self._buffers.items() for job in buf.flush()])
            # Every pending write happens here, where a failure raises; close then has nothing
            # left to write (closing after a failed write is what crashes, see the module docstring).
            f.flush()
        except BaseException as exc:
            self.drop()
            if isinstance(exc, Exception):
                raise write_error(exc, self.path) from exc
            raise
        self.datasets = {}
        self.file = None
        self._close_marker()
        try:
            f.close()
        except Exception as exc:
            self.path.unlink(missing_ok=True)
            raise write_error(exc, self.path) from exc
        return SealedShard(self.path, self.path.with_name(self.final_name), self.start, self.stop, self.rows)

    def drop(self) -> None:
        """Abandon the shard: close its file without writing anything more to disk and delete the
        .partial. Safe after a failed write (see the module docstring); never raises."""
        if self.file is not None:
            _close_discarding(self.file, self.path)  # before the dataset handles go: their close writes too
        self.file, self.datasets = None, {}
        self._close_marker()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # left for the next open to delete
            logger.debug("could not delete %s: %s", self.path, exc)


@dataclass(frozen=True)
class SealedShard:
    """A closed .partial whose bytes are final: ``commit`` makes it durable under its final name."""

    path: Path
    final: Path
    start: int
    stop: int
    rows: int

    def commit(self) -> ShardEntry:
        """fsync, rename to the final name, fsync the directory and hash the final file: the entry
        to list. No h5py: safe beside the writer thread. A failure before the rename deletes the
        .partial and raises StoreError (DiskFullError for lack of space)."""
        try:
            fsutil.fsync_path(self.path)  # the data must be on disk before the name says "finished"
            os.replace(self.path, self.final)
        except Exception as exc:
            self.path.unlink(missing_ok=True)
            raise write_error(exc, self.path) from exc
        fsutil.fsync_dir(self.final.parent)
        # Hash what is on disk, after the rename: the checksum covers the exact bytes listed.
        return ShardEntry(self.final.name, self.start, self.stop, self.rows, fsutil.sha256_file(self.final))


def _write_chunks(jobs: list[tuple[h5py.Dataset, tuple[int, Any]]]) -> None:
    """Write encoded chunks (row, future) in order, in the writer thread (the only one calling h5py)."""
    for ds, (row, future) in jobs:
        ds.id.write_direct_chunk((row, *(0,) * (ds.ndim - 1)), future.result(), 0)


def _close_discarding(f: h5py.File, path: Path) -> None:
    """Close an h5py file whose remaining writes must go nowhere: its descriptor is pointed at the
    null device (dup2) first, so the writes HDF5 still does on close succeed instead of failing
    (which h5py 3.16 / HDF5 2.0 do not survive). Only for the default (sec2) driver; other
    drivers, which fastattr never uses for shards, get a plain close."""
    try:
        fd = f.id.get_vfd_handle() if f.driver == "sec2" else None
        if isinstance(fd, int) and fd >= 0:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
    except Exception as exc:  # the plain close below is all that is left
        logger.debug("could not detach %s from its file: %s", path, exc)
    try:
        f.close()
    except Exception as exc:  # the file is abandoned anyway
        logger.debug("closing %s: %s", path, exc)


# errno values that mean "no room": the disk, a quota, or the per-process file-size limit.
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


_HDF5_ERRNO = re.compile(r"errno = (\d+)")  # HDF5's text for a failed system call


def space_errno(exc: BaseException) -> int | None:
    """The errno of a lack-of-space error in exc or its causes. h5py sets errno on the OSErrors
    it raises, but not on the RuntimeErrors (e.g. of a flush), whose HDF5 text still names it."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short cause chain: StoreError <- OSError
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _SPACE_ERRNOS:
            return seen.errno
        if isinstance(seen, (OSError, RuntimeError)) and (m := _HDF5_ERRNO.search(str(seen))) and int(m.group(1)) in _SPACE_ERRNOS:
            return int(m.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def write_error(exc: BaseException, path: Path) -> StoreError:
    """The StoreError to raise for a failed write of ``path``: a DiskFullError saying what to do
    when the disk, a quota or the file-size limit is full, else a StoreError naming the file."""
    if isinstance(exc, StoreError):
        return exc
    code = space_errno(exc)
    where = f"{path.name} in {path.parent}"
    tail = "finished shards are intact; {}, then rerun the same command to resume"
    if code == errno.EFBIG:
        limit = _file_size_limit()
        what = f"the file-size limit ({limit} bytes; ulimit -f, RLIMIT_FSIZE)" if limit is not None else "the largest file size allowed"
        return DiskFullError(
            f"file too large: {what} was reached while writing {where}; "
            + tail.format("raise the limit or use a smaller shard size (--shard-size, shard_size=)")
        )
    if code is not None:
        free = _free_bytes(path.parent)
        kind = "disk quota exceeded" if code != errno.ENOSPC else "disk full"
        return DiskFullError(f"{kind} while writing {where}: {free} bytes free; " + tail.format("free space"))
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StoreError(f"cannot write {where}: {type(exc).__name__}: {reason}")


def _free_bytes(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free:,}"
    except OSError:
        return "unknown"


def _file_size_limit() -> int | None:
    try:
        import resource  # POSIX only

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def stored_shapes(path: Path) -> dict[str, Any]:
    """The shapes (as block.block_shapes gives them) that a resumed run's new blocks must match,
    from one of its shards (metadata only)."""
    try:
        with h5py.File(path, "r") as f:
            return {
                "attributions": {name: tuple(ds.shape[1:]) for name, ds in f["attributions"].items()},
                "target": tuple(f["target"].shape[1:]),
                "extras": {name: (tuple(ds.shape[1:]), ds.dtype.str) for name, ds in f.get("extras", {}).items()},
            }
    except Exception as exc:
        raise StoreError(f"{path}: cannot read the shard to resume ({exc})") from exc
