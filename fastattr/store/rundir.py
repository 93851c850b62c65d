"""A run directory as one writer owns it: the writer lock, the listing of finalized shards and
the run's status, and the manifest (or, for a rank > 0, the fragment) that records them.

Opening prepares the directory in the caller's thread, before any writer thread exists: a new run
writes its manifest before any shard; a resumed run must match the stored config and total (else
RunMismatchError) and every shard it lists is checked (structure and sha256; a bad one is renamed
``<name>.corrupt`` and dropped from the listing, so its samples are computed again); the coordinator
(rank 0) merges the shards listed in this run's rank fragments and deletes the untrusted files it can
prove are its own (store/ownership.py); a rank > 0 joins the run rank 0 prepared and deletes nothing.
A directory that holds no fastattr run but other files is refused unless ``allow_other_files``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from ..errors import RunMismatchError, StoreError
from . import fsutil
from .fsutil import fastattr_version, now, write_json_atomic
from .integrity import RunIdentity, check_shards, set_aside
from .manifest import (
    ShardEntry,
    manifest_kind,
    overlapping_shards,
    read_fragments,
    read_manifest,
    run_diff,
    union_shards,
)
from .ownership import delete_own_temporaries, delete_shards, foreign_entries, next_shard_id, unlisted_shards
from .ranges import complement_ranges, format_ranges, merge_ranges
from .schema import (
    FRAGMENT_FORMAT,
    FRAGMENT_RE,
    LOCK_NAME,
    MANIFEST_NAME,
    RANK_LOCK_FORMAT,
    RANK_LOCK_RE,
    SCHEMA_VERSION,
    VOLATILE_CONFIG_KEYS,
)
from .shard import stored_shapes

logger = logging.getLogger(__name__)


class RunDirectory:
    """The on-disk state of one writer's run (see the module docstring); call open() once.

    The shard listing and the status are shared between the caller and the writer thread, guarded
    by an internal lock; ``covered`` / ``missing()`` / ``complete`` read them. ``run_id`` and ``first_shard_id`` are known after open() (a rank > 0 is given
    rank 0's); ``expect`` holds the shapes a resumed run's new blocks must keep (None if unknown).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        config: dict[str, Any],
        total: int,
        volatile: frozenset[str],
        shard_prefix: str,
        rank: int,
        world_size: int,
        run_id: str | None,
        first_shard_id: int | None,
        allow_other_files: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self._allow_other_files = allow_other_files
        self.config = config
        self.total = total
        self._volatile = volatile
        self.shard_prefix = shard_prefix
        self.rank, self.world_size = rank, world_size
        self._fragment = rank > 0  # lists its shards in a fragment; rank 0 merges them
        self.run_id = run_id  # identifies the run; rank 0's is read or made on open
        self.first_shard_id = first_shard_id
        self.expect: dict[str, Any] | None = None
        self.dropped: list[ShardEntry] = []  # listed shards that failed their checks on open (set aside)
        self._lock = threading.RLock()  # guards _shards / _status, shared with the writer thread
        self._shards: list[ShardEntry] = []
        self._status = "running"
        self._created = now()
        self._lock_fd: int | None = None
        self._base_files: set[str] = set()  # a rank > 0's view of the shards listed before it joined

    def open(self, *, resume: bool, overwrite: bool) -> None:
        """Create or check the directory, take the lock and load, resume, join or replace the run there."""
        d = self.run_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create run directory {d}: {exc}") from exc
        if not d.is_dir():
            raise StoreError(f"run directory {d} is not a directory")
        if not self._fragment:
            self._refuse_foreign(overwrite=overwrite)  # before the lock file: leave such a directory untouched
        # Fail here, not in the writer thread minutes later: prove we can create files.
        try:
            fsutil.probe_writable(d)
        except OSError as exc:
            raise StoreError(f"run directory {d} is not writable: {exc}") from exc
        self._acquire_lock()
        try:
            self._load_or_create(resume=resume, overwrite=overwrite)
        except OSError as exc:
            self.release_lock()
            raise StoreError(f"cannot prepare run directory {d}: {exc}") from exc
        except BaseException:
            self.release_lock()
            raise

    def _acquire_lock(self) -> None:
        path = self.run_dir / (RANK_LOCK_FORMAT.format(self.rank) if self._fragment else LOCK_NAME)
        who = f"another process writing as rank {self.rank}" if self._fragment else "another RunWriter"
        self._lock_fd = fsutil.acquire_lock(path, in_use=f"run directory {self.run_dir} is in use by {who} (lock {path}); close() it first")
        if self._lock_fd is not None and not self._fragment:
            try:
                self._check_rank_locks()
            except BaseException:
                self.release_lock()
                raise

    def _check_rank_locks(self) -> None:
        """The coordinator is about to merge fragments and delete untrusted files: refuse while a
        rank of an earlier launch still writes here (its process holds its rank lock)."""
        for p in self.run_dir.iterdir():
            if m := RANK_LOCK_RE.fullmatch(p.name):
                in_use = f"run directory {self.run_dir} is in use: rank {int(m.group(1))} of a distributed run still writes into it (lock {p})"
                fsutil.ensure_unlocked(p, in_use=in_use)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            fsutil.release_lock(self._lock_fd)
            self._lock_fd = None

    def _refuse_foreign(self, *, overwrite: bool) -> None:
        """StoreError for a directory fastattr must not write into: a manifest.json that is not
        fastattr's (never replaced, even with overwrite), no run but other files (unless allowed),
        or, for a distributed run, files of a fragment's name that are someone else's."""
        d = self.run_dir
        kind = manifest_kind(d / MANIFEST_NAME)
        if kind == "foreign":
            raise StoreError(f"{d / MANIFEST_NAME} is not a fastattr manifest; fastattr will not replace it or touch the files it names (overwrite={overwrite}): choose another directory")
        if kind == "none" and not self._allow_other_files and (other := foreign_entries(d)):
            shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
            raise StoreError(
                f"{d} holds no fastattr run but other files ({shown}); choose a new or empty directory, "
                "or allow other files (fastattr.run(..., allow_other_files=True), `fastattr run --allow-other-files`), which fastattr then leaves alone"
            )
        if self.world_size > 1:
            for p in d.iterdir():
                if FRAGMENT_RE.fullmatch(p.name) and manifest_kind(p) == "foreign":
                    raise StoreError(f"{p} is not a fastattr fragment, and the ranks of this run write files of that name: move it away")

    def _load_or_create(self, *, resume: bool, overwrite: bool) -> None:
        d = self.run_dir
        manifest_path = d / MANIFEST_NAME
        if self._fragment:
            self._join(manifest_path)
            return
        self._refuse_foreign(overwrite=overwrite)  # again, under the lock
        existing = manifest_kind(manifest_path) != "none"
        if existing and not overwrite and not resume:
            raise StoreError(f"{d} already holds a run ({manifest_path} exists); pass resume=True or overwrite=True")

        if existing and not overwrite:
            self._resume_from(manifest_path)  # a different run is refused before anything changes
            delete_own_temporaries(d)
            stored_id = self.run_id  # what this run's shards carry (None: a manifest from before run ids)
            had_id = self.run_id is not None
            if self.run_id is None:  # a manifest from before run ids: the ranks need one to join
                self.run_id = uuid.uuid4().hex
            found = self.absorb_fragments(strict=False)
            dropped = self._drop_bad_shards(stored_id)
            if found or not had_id or dropped:
                self.write_manifest()  # lists the fragments' shards (and no bad one) before the fragments go
                for p in found:
                    p.unlink(missing_ok=True)
            with self._lock:
                if self._shards:
                    self.expect = stored_shapes(self.run_dir / self._shards[0].file)
            # orphans of this run only: a shard another run wrote (a user's copy) is not this run's to delete
            orphans = unlisted_shards(d, [s.file for s in self._shards], self.shard_prefix)
            delete_shards(d, orphans, "not listed in the manifest, so not trusted", run_id=stored_id)
        else:
            delete_own_temporaries(d)
            # Fragments go first: once the new manifest exists their shards are mere orphans.
            for p in d.iterdir():
                if FRAGMENT_RE.fullmatch(p.name) and manifest_kind(p) != "foreign":
                    p.unlink(missing_ok=True)
            self.run_id = uuid.uuid4().hex  # a new run: fragments of any other are ignored
            if existing:
                self._discard_existing(manifest_path)
            else:
                # Write the manifest before any shard: the directory is then recognisably this run,
                # and a crash before the first shard still leaves something resume can check.
                self.write_manifest()
        self.first_shard_id = next_shard_id(d, [s.file for s in self._shards], self.shard_prefix)

    def _join(self, manifest_path: Path) -> None:
        """A rank > 0 joins the run rank 0 prepared: same run id and config; deletes nothing."""
        if not manifest_path.is_file():
            raise StoreError(
                f"rank {self.rank}: no {manifest_path}; rank 0 writes it before the other ranks start, "
                "so the run directory must be on a filesystem that every rank (every node) shares"
            )
        man = read_manifest(manifest_path)
        if man.get("run_id") != self.run_id:
            raise StoreError(
                f"rank {self.rank}: {manifest_path} is run {man.get('run_id')!r}, not run {self.run_id!r} that rank 0 prepared; "
                "is the run directory on a filesystem that every rank shares, and written by this job only?"
            )
        if diffs := run_diff(man, self.config, self.total, self._volatile):
            raise RunMismatchError(f"rank {self.rank}: its run differs from rank 0's in: {', '.join(diffs)} (every rank must load the same model, data and settings)")
        self._shards = list(man["shards"])
        self._base_files = {s.file for s in self._shards}
        self._created = str(man.get("created") or self._created)
        if self._shards:
            self.expect = stored_shapes(self.run_dir / self._shards[0].file)

    def absorb_fragments(self, *, strict: bool = True) -> list[Path]:
        """Coordinator: adopt the shards listed by this run's rank fragments. Returns every fragment
        file found (this run's and stale ones), to delete once manifest.json lists those shards.
        strict: a listed shard file that is missing or empty is an error (on open, the full check
        of _drop_bad_shards follows instead and drops it)."""
        ours, stale = read_fragments(self.run_dir, self.run_id, self.total)
        for p in stale:
            logger.warning("ignoring %s: it belongs to another run", p)
        with self._lock:
            shards = self._shards
            for path, frag in ours:
                for s in frag["shards"] if strict else ():
                    f = self.run_dir / s.file
                    if not f.is_file() or f.stat().st_size <= 0:
                        raise StoreError(f"{f}: listed in {path} but missing or empty; pass overwrite=True to start afresh")
                shards = union_shards(shards, frag["shards"], path)
            if pairs := overlapping_shards(shards):
                a, b = pairs[0]
                raise StoreError(f"{self.run_dir}: shards {a.file} [{a.start}, {a.stop}) and {b.file} [{b.start}, {b.stop}) overlap")
            added = len(shards) - len(self._shards)
            self._shards = shards
        if added:
            logger.info("merged %d shards from %d rank fragments into %s", added, len(ours), self.run_dir / MANIFEST_NAME)
        return [p for p, _ in ours] + stale

    def _discard_existing(self, manifest_path: Path) -> None:
        """overwrite=True: replace the manifest first (atomically, with an empty shard list), then
        delete the old run's shards, listed or orphaned, that prove to be fastattr's, so a crash in
        between leaves orphans, never a dangling listing."""
        old_files: set[str] = set()
        old_id: str | None = None  # the old run's shards carry it; others' shards are not its to delete
        try:
            old = read_manifest(manifest_path)
            old_files = {s.file for s in old["shards"]}
            old_id = RunIdentity.of(old).run_id
        except StoreError as exc:  # a damaged fastattr manifest is exactly what overwrite is for
            logger.warning("overwriting an unreadable run: %s", exc)
        logger.info("overwrite=True: discarding the run in %s", self.run_dir)
        self.write_manifest()
        delete_shards(self.run_dir, old_files, "overwrite=True discards the previous run", run_id=old_id)
        orphans = unlisted_shards(self.run_dir, old_files, self.shard_prefix)
        delete_shards(self.run_dir, orphans, "not listed in the manifest, so not trusted", run_id=old_id)

    def _resume_from(self, manifest_path: Path) -> None:
        man = read_manifest(manifest_path)
        if diffs := run_diff(man, self.config, self.total, self._volatile):
            raise RunMismatchError(
                f"{self.run_dir} holds a different run (differs in: {', '.join(diffs)}); "
                "pass overwrite=True to replace it, or choose another directory"
            )
        shards: list[ShardEntry] = man["shards"]
        if pairs := overlapping_shards(shards):
            a, b = pairs[0]
            raise StoreError(f"{manifest_path}: shards {a.file} and {b.file} overlap")
        self._shards = list(shards)
        self._status = man["status"]
        self._created = str(man.get("created") or self._created)
        self.run_id = man.get("run_id") if isinstance(man.get("run_id"), str) else None
        logger.info("resuming %s: %d of %d samples already stored in %d shards", self.run_dir, sum(s.rows for s in shards), self.total, len(shards))

    def _drop_bad_shards(self, run_id: str | None) -> list[ShardEntry]:
        """Check every listed shard in full (exists, sha256, structure, nothing outside the run, run
        id ``run_id`` and the config) and drop the bad ones: renamed <name>.corrupt, unlisted, so
        their samples are computed again. Reads every listed byte once (measured in
        docs/architecture.md); returns the dropped."""
        with self._lock:
            shards = list(self._shards)
        bad = check_shards(self.run_dir, shards, run=RunIdentity(run_id, self.config, self._volatile))
        if not bad:
            return []
        dropped = [s for s in shards if s.file in bad]
        for s in dropped:
            aside = set_aside(self.run_dir / s.file)
            kept = f"; kept as {aside.name}" if aside is not None else ""
            logger.warning("%s: dropped from the run, its samples [%d, %d) will be computed again%s", bad[s.file], s.start, s.stop, kept)
        with self._lock:
            self._shards = [s for s in self._shards if s.file not in bad]
            self._status = "running"
        self.dropped = dropped
        return dropped

    # -- manifest ----------------------------------------------------------------------------------

    def write_manifest(self, status: str | None = None) -> None:
        with self._lock:
            if status is not None:
                self._status = status
            man = {
                "schema_version": SCHEMA_VERSION,
                "fastattr_version": fastattr_version(),
                "status": self._status,
                "config": self.config,
                "total": self.total,
                "run_id": self.run_id,
                "created": self._created,
                "updated": now(),
                "shards": [s.entry() for s in self._shards],
            }
            if extra := sorted(self._volatile - VOLATILE_CONFIG_KEYS):  # what verify may ignore comparing a shard's config to this
                man["volatile_keys"] = extra
            if self._fragment:  # only this rank's own shards; never "complete": rank 0 decides
                man.update(status="running", rank=self.rank, world_size=self.world_size)
                man["shards"] = [s.entry() for s in self._shards if s.file not in self._base_files]
        name = FRAGMENT_FORMAT.format(self.rank) if self._fragment else MANIFEST_NAME
        write_json_atomic(self.run_dir / name, man)

    # -- state ---------------------------------------------------------------------------------------

    @property
    def covered(self) -> list[tuple[int, int]]:
        """Merged, sorted [start, stop) ranges already finalized (listed in the manifest)."""
        with self._lock:
            return merge_ranges((s.start, s.stop) for s in self._shards)

    def missing(self) -> list[tuple[int, int]]:
        """Sorted [start, stop) ranges of [0, total) not yet finalized."""
        return complement_ranges(self.covered, self.total)

    @property
    def complete(self) -> bool:
        with self._lock:
            status = self._status
        return status == "complete" and not self.missing()

    def write_final_manifest(self, *, complete: bool | None, merge_fragments: bool) -> None:
        """On close: a coordinator merges the fragments (unless merge_fragments=False) and writes
        status "complete" when nothing is missing (or as given); a rank > 0 writes its fragment."""
        if self._fragment:
            if any(s.file not in self._base_files for s in self._shards):  # else no fragment to leave behind
                self.write_manifest()
            return
        found = self.absorb_fragments() if merge_fragments else []  # the other ranks closed first
        missing = self.missing()
        complete = not missing if complete is None else complete
        if complete and missing:
            logger.warning("closing %s as complete although %s are missing", self.run_dir, format_ranges(missing))
        try:
            self.write_manifest("complete" if complete else "running")
        except OSError as exc:
            raise StoreError(f"cannot write {self.run_dir / MANIFEST_NAME}: {exc}") from exc
        for p in found:  # listed in manifest.json now
            p.unlink(missing_ok=True)


    def add_shard(self, entry: ShardEntry) -> None:
        """List a finished (durable) shard in the manifest or fragment."""
        # Held across the manifest write, so `covered` never runs ahead of what is on disk.
        with self._lock:
            self._shards.append(entry)
            self._shards.sort(key=lambda s: s.start)
            status_before, self._status = self._status, "running"
            try:
                self.write_manifest()
            except BaseException:  # not listed on disk, so not covered: the next open deletes the orphan
                self._shards.remove(entry)
                self._status = status_before
                raise
