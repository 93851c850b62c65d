"""One shard file: creating it as ``*.partial``, appending block rows, finalizing it (stamp,
close, fsync, rename, fsync the directory, sha256), and the structural check of a finished one.

A shard holds contiguous global indices [start, stop); its datasets start empty and grow block by
block, so the .partial never holds unwritten rows and finalizing only has to stamp attributes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from . import fsutil
from .block import Block
from .manifest import ShardEntry
from .schema import (
    CHUNK_TARGET_BYTES,
    GZIP_LEVEL,
    PARTIAL_SUFFIX,
    SCALAR_CHUNK_ROWS,
    SCALAR_DTYPES,
    SCHEMA_VERSION,
    STAT_DTYPES,
    WRITE_CHUNK_CACHE_BYTES,
)

logger = logging.getLogger(__name__)


class ShardLayout:
    """How one writer lays out its shards: storage dtype, compression, rows per shard. Also casts
    attributions to the storage dtype, warning once per writer when values overflow it."""

    def __init__(self, storage_dtype: str, compression: str, shard_rows: int) -> None:
        self.storage_dtype = np.dtype(storage_dtype)
        self.compression = compression
        self.shard_rows = shard_rows
        self._overflow_warned = False

    def chunk_rows(self, feature_shape: tuple[int, ...]) -> int:
        row_bytes = max(1, math.prod(feature_shape) * self.storage_dtype.itemsize)
        return max(1, min(self.shard_rows, CHUNK_TARGET_BYTES // row_bytes))

    def to_storage(self, a: np.ndarray) -> np.ndarray:
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

    def create(self, path: Path, shard_id: int, start: int, block: Block) -> OpenShard:
        """A new empty shard file at ``path`` (a .partial name) with the datasets of block's fields."""
        shard = OpenShard(path, shard_id, start, self)
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

    def __init__(self, path: Path, shard_id: int, start: int, layout: ShardLayout) -> None:
        self.path = path  # the .partial path
        self.shard_id = shard_id
        self.start = start
        self.layout = layout
        self.rows = 0
        self.opened = time.monotonic()
        self.file: h5py.File | None = None

    @property
    def stop(self) -> int:
        return self.start + self.rows

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
        for name, a in block.attributions.items():
            write(group[name], self.layout.to_storage(a[lo:hi]))
        write(f["index"], np.arange(block.start + lo, block.start + hi, dtype=np.int64))
        write(f["target"], block.target[lo:hi].astype(np.int64, copy=False))
        for name, dtype in SCALAR_DTYPES.items():
            write(f[name], getattr(block, name)[lo:hi].astype(dtype, copy=False))
        for name, dtype in STAT_DTYPES.items():
            write(f["stats"][name], block.stats[name][lo:hi].astype(dtype, copy=False))
        if set(f.get("extras", {})) != set(block.extras):
            raise ValueError(f"{self.path}: extra fields {sorted(block.extras)} differ from the shard's {sorted(f.get('extras', {}))}")
        for name, a in block.extras.items():
            write(f["extras"][name], a[lo:hi])
        self.rows = r1

    def finish(self, *, method: str, config_json: str) -> ShardEntry:
        """Stamp the attributes, close, fsync, rename to the final name, fsync the directory and
        hash the final file: the entry to list, for a shard that is now durable on disk."""
        f = self.file
        assert f is not None
        try:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["method"] = method
            f.attrs["config_json"] = config_json
            f.attrs["shard_id"] = self.shard_id
            f.attrs["start"] = self.start
            f.attrs["stop"] = self.stop
            f.close()
        finally:
            self.close_quietly()
        fsutil.fsync_path(self.path)  # the data must be on disk before the name says "finished"
        final = self.path.with_name(self.path.name[: -len(PARTIAL_SUFFIX)])
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


def check_shard_file(f: h5py.File, shard: ShardEntry) -> None:
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
