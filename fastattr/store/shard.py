"""One shard file: creating it as ``.fastattr-<name>.partial``, appending block rows, finalizing
it (stamp, close, fsync, rename, fsync the directory, sha256), and its marker.

A shard holds contiguous global indices [start, stop); its datasets start empty and grow block by
block, so the .partial never holds unwritten rows and finalizing only has to stamp attributes.

The marker (schema 2) is the shard's 512-byte HDF5 user block, which HDF5 reserves and never
touches: magic, run id, shard id, start and the rows written so far (updated after every append,
not fsynced). It proves a file is fastattr's without trusting its HDF5 content (a shard killed
before close is unreadable) and lets ``fastattr info`` show the rows of a shard in progress.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from . import fsutil
from .block import Block
from .manifest import ShardEntry
from .ranges import format_ranges, value_runs
from .schema import (
    CHUNK_TARGET_BYTES,
    GZIP_LEVEL,
    MARKER_FORMAT,
    MARKER_MAGIC,
    MARKER_ROWS_OFFSET,
    OWN_PREFIX,
    PARTIAL_SUFFIX,
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
        # A chunk cache larger than the largest chunk (1 MiB) keeps a block's trailing partial
        # chunk in memory until the next block completes it, instead of recompressing it twice.
        f = h5py.File(shard.path, "w", rdcc_nbytes=WRITE_CHUNK_CACHE_BYTES, libver=SHARD_LIBVER, userblock_size=USERBLOCK_SIZE)
        shard.file = f
        shard.open_marker()
        comp: dict[str, Any] = {"fletcher32": True}  # per-chunk checksums, checked by every HDF5 read
        if self.compression == "lzf":
            comp.update(compression="lzf")
        elif self.compression == "gzip":
            comp.update(compression="gzip", compression_opts=GZIP_LEVEL)
        scalar_chunk = min(self.shard_rows, SCALAR_CHUNK_ROWS)

        # Datasets start empty and grow block by block (resizable along rows).
        def make(group: h5py.Group, name: str, dtype: Any, tail: tuple[int, ...], chunk_rows: int) -> None:
            group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk_rows, *tail), **comp)

        attributions = f.create_group("attributions", track_order=True)  # keep the caller's name order
        for name, a in block.attributions.items():
            make(attributions, name, self.storage_dtype, a.shape[1:], self.chunk_rows(a.shape[1:]))
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
        self._marker_fd: int | None = None

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

    def append(self, block: Block, lo: int, hi: int) -> None:
        """Append block rows [lo, hi): one resize + one write per dataset."""
        f = self.file
        assert f is not None
        r0, r1 = self.rows, self.rows + (hi - lo)

        def write(ds: h5py.Dataset, data: np.ndarray) -> None:
            if ds.shape[1:] != data.shape[1:]:
                raise ValueError(f"{self.path}: dataset {ds.name} has rows of shape {ds.shape[1:]}, block has {data.shape[1:]}")
            ds.resize(r1, axis=0)
            ds[r0:r1] = data

        group = f["attributions"]
        if set(group) != set(block.attributions):
            raise ValueError(f"{self.path}: attribution names {sorted(block.attributions)} differ from the shard's {sorted(group)}")
        stored, nonfinite = self.layout.stored_rows(block, lo, hi)
        for name, a in stored.items():
            write(group[name], a)
        write(f["index"], np.arange(block.start + lo, block.start + hi, dtype=np.int64))
        write(f["target"], block.target[lo:hi].astype(np.int64, copy=False))
        for name, dtype in SCALAR_DTYPES.items():
            write(f[name], getattr(block, name)[lo:hi].astype(dtype, copy=False))
        for name, dtype in STAT_DTYPES.items():
            data = nonfinite if name == "nonfinite" else block.stats[name][lo:hi]
            write(f["stats"][name], data.astype(dtype, copy=False))
        if set(f.get("extras", {})) != set(block.extras):
            raise ValueError(f"{self.path}: extra fields {sorted(block.extras)} differ from the shard's {sorted(f.get('extras', {}))}")
        for name, a in block.extras.items():
            write(f["extras"][name], a[lo:hi])
        self.rows = r1
        self._mark_rows()

    def finish(self, *, method: str, config_json: str) -> ShardEntry:
        """Stamp the attributes, close, fsync, rename to the final name, fsync the directory and
        hash the final file: the entry to list, for a shard that is now durable on disk."""
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
            f.close()
        finally:
            self.close_quietly()
        fsutil.fsync_path(self.path)  # the data must be on disk before the name says "finished"
        final = self.path.with_name(self.final_name)
        os.replace(self.path, final)
        fsutil.fsync_dir(final.parent)
        # Hash what is on disk, after the rename: the checksum covers the exact bytes listed.
        return ShardEntry(final.name, self.start, self.stop, self.rows, fsutil.sha256_file(final))

    def close_quietly(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception as exc:  # the file is abandoned anyway
                logger.debug("closing %s: %s", self.path, exc)
            self.file = None
        if self._marker_fd is not None:
            os.close(self._marker_fd)
            self._marker_fd = None


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
