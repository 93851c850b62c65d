"""Reading a run: ``open_run`` -> ``RunReader``, a lazy, read-only view of the finalized shards
(manifest.json plus unmerged rank fragments), indexed by global sample index, reading only what is
asked and keeping an LRU of open shard files.

Opening checks every listed shard's structure (metadata only; nothing that points outside the run,
store/integrity.py); ``verify=True`` also checks every shard's sha256 (reads every byte). Reads of
schema-2 shards check HDF5's per-chunk fletcher32 checksums, so a damaged chunk raises
CorruptShardError naming the shard instead of returning wrong numbers."""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from .integrity import RunIdentity, check_shard_file, check_shards, raise_problem
from .manifest import ShardEntry, overlapping_shards, read_listing
from .ranges import format_ranges, value_runs
from .schema import MANIFEST_NAME, SCALAR_DTYPES, STAT_KEYS
from .status import InProgress, run_state, shards_in_progress


def open_run(
    run_dir: str | os.PathLike[str], *, max_open_files: int = 64, verify: bool = False, dtype: Any = None, check_run: bool = True
) -> RunReader:
    """Open a run directory for reading (see RunReader); verify=True also checks every shard's
    sha256 first (reads the whole run once); dtype="float32": attributions are returned in that
    dtype whatever the run stores (None: as stored, e.g. float16 for storage_dtype="float16")."""
    return RunReader(run_dir, max_open_files=max_open_files, verify=verify, dtype=dtype, check_run=check_run)


class RunReader:
    """Lazy, read-only view of a run's finalized shards, indexed by global sample index.

    ``reader[i]`` -> one sample's fields; ``reader[a:b]`` -> the same fields stacked (missing
    indices raise KeyError); ``field("stats/l1")`` -> one per-sample field for every stored sample;
    ``iter_batches()`` -> shard-by-shard batches in constant memory. Works on a run in progress
    (a snapshot of its manifest at open). Close it (or use ``with``) to release file handles.
    A damaged shard raises CorruptShardError (a StoreError) naming it, at open or on read.

    Attributions come back in the stored dtype (``storage_dtype``) unless ``dtype`` is given. A run
    made with ``channel_reduce`` stores (H, W) maps of (C, H, W) inputs: ``channel_reduce`` says how.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], *, max_open_files: int = 64, verify: bool = False, dtype: Any = None, check_run: bool = True
    ) -> None:
        """check_run=False skips checking that every shard is this run's (its run id and config
        against the manifest's): for showing what a manifest says (``fastattr info``), never for
        reading values, which verify and resume check too."""
        self.run_dir = Path(run_dir)
        try:
            self.dtype: np.dtype | None = None if dtype is None else np.dtype(dtype)
        except TypeError as exc:
            raise StoreError(f"dtype must be a numpy floating dtype such as 'float32' or None (as stored), got {dtype!r}") from exc
        if self.dtype is not None and self.dtype.kind != "f":
            raise StoreError(f"dtype must be a floating dtype such as 'float32' or None (as stored), got {dtype!r}")
        man = read_listing(self.run_dir)  # manifest.json plus unmerged rank fragments
        self._manifest = man
        self._shards: list[ShardEntry] = man["shards"]
        self.total: int = man["total"]
        if pairs := overlapping_shards(self._shards):
            a, b = pairs[0]
            raise StoreError(f"{self.run_dir / MANIFEST_NAME}: shards {a.file} [{a.start}, {a.stop}) and {b.file} [{b.start}, {b.stop}) overlap")
        self._names: list[str] = []
        identity = RunIdentity.of(man) if check_run else None  # every shard must be this run's, written with its config
        if verify and (bad := check_shards(self.run_dir, self._shards, run=identity)):
            raise_problem("; ".join(bad[s.file] for s in self._shards if s.file in bad))
        for i, s in enumerate(self._shards):
            path = self.run_dir / s.file
            if not path.is_file():
                raise StoreError(f"{path}: listed in the manifest but missing")
            try:
                with h5py.File(path, "r") as f:
                    check_shard_file(f, s, identity)
                    names = list(f["attributions"])
            except StoreError:
                raise
            except Exception as exc:  # truncated / not HDF5 / unreadable
                raise_problem(f"{path}: cannot open the shard ({type(exc).__name__}: {exc})")
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
        """The run's config plus status (as ``status``), total, shards (and schema/version/timestamps)."""
        m = self._manifest
        meta = json.loads(json.dumps(m["config"]))  # a copy the caller may modify
        meta.update(
            status=self.status,
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
        """Now: "complete", "running" (a writer process holds the run's lock) or "stopped" (no
        writer: closed early or killed; rerunning the same command resumes it)."""
        return run_state(self.run_dir, self._manifest["status"])

    @property
    def run_id(self) -> str | None:
        return self._manifest.get("run_id")

    def in_progress(self) -> list[InProgress]:
        """Shards of this run being written now (or left unfinished by a stopped writer), with the
        rows their markers report: not stored, not trusted, recomputed if the writer stopped."""
        return shards_in_progress(self.run_dir, self.run_id)

    @property
    def storage_dtype(self) -> str:
        """The dtype the run stores its attributions in ("float32" or "float16"), from its config."""
        return str(self._manifest["config"].get("storage_dtype") or "float32")

    @property
    def channel_reduce(self) -> dict[str, Any] | None:
        """None, or how the run reduced its attributions before storing them (run(channel_reduce=)):
        {"mode": "sum" | "abs" | "l2", "dim": 0 (the sample's channel dim), "input_shapes",
        "stored_shapes" (per sample, per attributed input: (C, H, W) -> (H, W)), "stats": a note that
        stats/* and delta are those of the full attributions}."""
        value = self._manifest["config"].get("channel_reduce")
        return json.loads(json.dumps(value)) if isinstance(value, dict) else None

    def compressions(self) -> dict[str, int]:
        """How many shards store their attributions with each filter ("gzip", "lzf", "none"), read from
        the shards: a run resumed with another ``compression`` (or made with "auto") mixes them, and
        the config records only the last option given. Opens every shard."""
        out: dict[str, int] = {}
        for shard in self._shards:
            group = self._file(shard)["attributions"]
            names = [n for n in self._names if n in group] or list(group)
            kind = str(group[names[0]].compression or "none") if names else "none"
            out[kind] = out.get(kind, 0) + 1
        return out

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

    def _file(self, shard: ShardEntry) -> h5py.File:
        f = self._files.get(shard.file)
        if f is not None:
            self._files.move_to_end(shard.file)
            return f
        path = self.run_dir / shard.file
        try:
            f = h5py.File(path, "r")
        except Exception as exc:
            raise_problem(f"{path}: cannot open the shard ({type(exc).__name__}: {exc})")
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

    def _read(self, shard: ShardEntry, lo: int, hi: int, step: int = 1) -> dict[str, Any]:
        """Rows [lo:hi:step] (shard-local) of every dataset."""
        f = self._file(shard)
        sl = slice(lo, hi, step)
        try:
            return {
                "attributions": {name: self._cast(f["attributions"][name][sl]) for name in self._names},
                "target": f["target"][sl],
                "output": f["output"][sl],
                "baseline_output": f["baseline_output"][sl],
                "delta": f["delta"][sl],
                "n_steps": f["n_steps"][sl],
                "stats": {k: f["stats"][k][sl] for k in STAT_KEYS},
                "extras": {name: ds[sl] for name, ds in f["extras"].items()} if "extras" in f else {},
                "index": f["index"][sl],
            }
        except Exception as exc:  # a failed fletcher32 checksum reads "filter returned failure"
            raise_problem(f"{self.run_dir / shard.file}: cannot read rows [{lo}, {hi}), the shard is damaged ({type(exc).__name__}: {exc})")

    def _cast(self, a: np.ndarray) -> np.ndarray:
        return a if self.dtype is None or a.dtype == self.dtype else a.astype(self.dtype)

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

    def _locate(self, index: int) -> ShardEntry | None:
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
            raise KeyError(f"samples not stored in {self.run_dir}: {format_ranges(value_runs(idx[~stored]))} (run status {self.status!r})")
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
            try:
                parts.append(self._cast(f[name][()]) if name.startswith("attributions/") else f[name][()])
            except Exception as exc:
                raise_problem(f"{self.run_dir / s.file}: cannot read {name}, the shard is damaged ({type(exc).__name__}: {exc})")
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

