"""Whether a finished shard can be trusted, and whether a file is fastattr's at all.

``check_shard_file`` is the structural check every reader, resume and verify run on an open shard
(metadata only, no data read): attributes against the manifest entry, row counts, and nothing that
reads outside the file: only hard links (no soft, external or user-defined links), no external raw
storage, no virtual datasets, no filter but gzip / lzf / shuffle / fletcher32 (anything else needs a
plugin, which is foreign code), and in schema 2 fletcher32 on every dataset; given the run's
``RunIdentity``, also that the shard is this run's (its run id) and was written with the manifest's
config (up to volatile keys), so a shard copied from another run, or a manifest edited to claim
another config, is caught even where the sha256 in the manifest was updated. ``shard_problem`` adds
the file's existence and its sha256 against the manifest; ``check_shards`` runs it over many shards
in threads (hashlib and h5py release the GIL while they read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import h5py

from ..errors import CorruptShardError, StoreError
from .fsutil import sha256_file
from .manifest import ShardEntry, config_diff
from .schema import ALLOWED_FILTERS, CORRUPT_SUFFIX, READ_SCHEMAS, RUN_VOLATILE_KEYS, VOLATILE_CONFIG_KEYS

REQUIRED = ("index", "attributions", "target", "output", "baseline_output", "delta", "n_steps", "stats")


@dataclass(frozen=True)
class RunIdentity:
    """What every shard of a run must say about itself: the run id stamped into it (None: not
    known, e.g. a manifest from before run ids) and the config it was written with, compared
    ignoring ``volatile`` keys (those may change between the launches of one run)."""

    run_id: str | None
    config: Mapping[str, Any] | None
    volatile: frozenset[str] = RUN_VOLATILE_KEYS

    @classmethod
    def of(cls, man: Mapping[str, Any]) -> RunIdentity:
        """The identity a read manifest claims: its volatile keys are the store's defaults plus those
        it lists beyond them ("volatile_keys"), or fastattr.run's set where it lists none."""
        run_id = man.get("run_id")
        keys = man.get("volatile_keys")
        volatile = VOLATILE_CONFIG_KEYS | frozenset(map(str, keys)) if isinstance(keys, list) else RUN_VOLATILE_KEYS
        return cls(run_id if isinstance(run_id, str) and run_id else None, man.get("config"), volatile)

    def problems(self, attrs: Any) -> list[str]:
        """Where a shard's attributes contradict this identity."""
        out = []
        got = attrs.get("run_id")
        got = got.decode(errors="replace") if isinstance(got, bytes) else got
        if self.run_id and isinstance(got, str) and got and got != self.run_id:
            out.append(f"it belongs to run {got!r}, not to this run ({self.run_id!r}): a shard of another run")  # repr: no control characters
        stored = attrs.get("config_json")
        if self.config is not None and stored is not None:
            try:
                config = json.loads(stored)
            except (TypeError, ValueError):
                return [*out, "attribute config_json is not JSON"]
            if diffs := config_diff(config, dict(self.config), self.volatile):
                shown = ", ".join(diffs[:5]) + (f" and {len(diffs) - 5} more" if len(diffs) > 5 else "")
                out.append(f"it was written with another config than the manifest's (differs in: {shown})")
        return out


def check_shard_file(f: h5py.File, shard: ShardEntry, run: RunIdentity | None = None) -> None:
    """Cheap structural checks of an open shard (metadata only), and with ``run`` that it is that
    run's shard; CorruptShardError naming the shard and the object at fault."""
    attrs = f.attrs
    version = attrs.get("schema_version")
    if version is None or int(version) not in READ_SCHEMAS:
        raise CorruptShardError(f"{f.filename}: attribute schema_version={version!r} is not one of {READ_SCHEMAS}")
    for key, want in (("start", shard.start), ("stop", shard.stop)):
        got = attrs.get(key)
        if got is None or int(got) != want:
            raise CorruptShardError(f"{f.filename}: attribute {key}={got!r} does not match the manifest ({want})")
    problems: list[str] = run.problems(attrs) if run is not None else []
    datasets: list[tuple[str, h5py.Dataset]] = []

    def visit_link(name: str, link: Any) -> None:
        if not isinstance(link, h5py.HardLink):  # soft, external or user-defined: may lead outside
            target = getattr(link, "path", "")
            where = f" to {getattr(link, 'filename', '')}:{target}" if isinstance(link, h5py.ExternalLink) else f" to {target}" if target else ""
            problems.append(f"/{name} is a {type(link).__name__}{where} (a shard holds its own data only)")
            return
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            datasets.append((name, obj))

    f.visititems_links(visit_link)
    for name, ds in datasets:
        problems.extend(_dataset_problems(name, ds, shard.rows, schema=int(version)))
    for name in REQUIRED:
        if name not in f:
            problems.append(f"/{name} is missing")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CorruptShardError(f"{f.filename}: {shown}")


def _dataset_problems(name: str, ds: h5py.Dataset, rows: int, *, schema: int) -> list[str]:
    out = []
    if ds.is_virtual:
        out.append(f"/{name} is a virtual dataset (it maps data from other files)")
    plist = ds.id.get_create_plist()
    if plist.get_external_count() > 0:
        files = sorted({plist.get_external(i)[0].decode(errors="replace") for i in range(plist.get_external_count())})
        out.append(f"/{name} stores its data in external files {files}")
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    if unknown := filters - set(ALLOWED_FILTERS):
        out.append(f"/{name} uses HDF5 filters {sorted(unknown)} (only {sorted(ALLOWED_FILTERS.values())} are allowed)")
    if schema >= 2 and not ds.is_virtual and 3 not in filters:
        out.append(f"/{name} has no fletcher32 checksum (schema {schema} shards checksum every chunk)")
    if ds.ndim == 0 or ds.shape[0] != rows:
        out.append(f"/{name} has shape {ds.shape}, not {rows} rows")
    return out


def shard_problem(run_dir: Path, shard: ShardEntry, *, checksum: bool = True, run: RunIdentity | None = None) -> str | None:
    """What is wrong with a listed shard (missing, empty, checksum mismatch, structure), or None."""
    path = run_dir / shard.file
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{path}: listed in the manifest but missing ({exc.strerror or exc})"
    if size <= 0:
        return f"{path}: listed in the manifest but empty"
    if checksum:
        try:
            digest = sha256_file(path)
        except OSError as exc:
            return f"{path}: unreadable ({exc})"
        if digest != shard.sha256:
            return f"{path}: checksum mismatch (manifest {shard.sha256[:12]}..., file {digest[:12]}...)"
    try:
        with h5py.File(path, "r") as f:
            check_shard_file(f, shard, run)
    except StoreError as exc:
        return str(exc)
    except Exception as exc:  # truncated / not HDF5 / damaged metadata
        return f"{path}: cannot open the shard ({type(exc).__name__}: {exc})"
    return None


def check_shards(run_dir: Path, shards: Iterable[ShardEntry], *, checksum: bool = True, run: RunIdentity | None = None) -> dict[str, str]:
    """shard_problem over many shards, in threads: {file: problem} of the bad ones."""
    shards = list(shards)
    if not shards:
        return {}
    workers = min(len(shards), os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastattr-check") as pool:
        found = pool.map(lambda s: (s.file, shard_problem(run_dir, s, checksum=checksum, run=run)), shards)
        return {name: problem for name, problem in found if problem is not None}


def set_aside(path: Path) -> Path | None:
    """Rename a bad shard to ``<name>.corrupt`` (replacing an older one): its samples are recomputed,
    the file is kept for inspection and never read again. None if the file is gone."""
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    return aside


def raise_problem(problem: str) -> NoReturn:
    """A shard problem as the error a reader raises, with what to do about it."""
    raise CorruptShardError(f"{problem}; run `fastattr verify --repair` on the run directory, then rerun the same command to recompute its samples")

