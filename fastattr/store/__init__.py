"""Run directories: attribution results as HDF5 shards plus a manifest, crash-safe and lazy to read.

A run directory holds ``manifest.json`` and finalized shards ``shard-00000.h5``, ... (shard format,
schema 2, in docs/architecture.md and the design notes). The manifest is the only source of truth:
a shard is trusted exactly when the manifest lists it, and it is listed only after it is complete
on disk. The write protocol for one shard is

    write  .fastattr-shard-XXXXX.h5.partial   (h5py; a file killed before close() is unreadable)
    close, fsync the file
    os.replace -> shard-XXXXX.h5, fsync the directory
    sha256 of the final file
    .fastattr-manifest.json.partial (fsync) -> os.replace -> manifest.json, fsync the directory

so a process killed at any instant leaves either the old manifest (the new shard, finished or not,
is an untrusted orphan, deleted when the run is reopened) or the new one (the shard is already
durable and its checksum matches). Names starting ``.fastattr-`` are fastattr's own: unfinished
ones are never trusted and are deleted on reopen; fastattr deletes nothing else it cannot prove it
wrote (store/ownership.py).

Trust (store/integrity.py): every dataset of a schema-2 shard carries a fletcher32 checksum per
chunk (plain h5py checks it on every read), the HDF5 metadata is checksummed, and a shard holds
its own data only (no links, external storage or virtual datasets). Opening a run checks every
shard's structure; resuming also checks every listed shard's sha256 and recomputes a bad one
(renamed ``<name>.corrupt``); ``verify_run(repair=True)`` drops bad shards for the next run.

The package, one job per module:

    schema     fixed names, dtypes and chunk sizes of schema 2 (and what schema 1 differs in)
    block      Block (one batch of results) and its checks in the caller
    fsutil     fsync, atomic JSON, sha256, the writability probe, the writer locks
    ranges     [start, stop) index ranges: merge, complement, runs, text
    manifest   reading and validating manifests and rank fragments, config comparison
    shard      one shard file: create, append (non-finite counted as stored), finalize, its marker
    integrity  the checks of a finished shard: structure, nothing outside the run, sha256
    ownership  which files fastattr may delete (and which directories it must not write into)
    rundir     the run directory a writer owns: lock, prepare / resume / join, the listing
    writer     RunWriter: the caller side, the bounded queue and the ONE writer thread
    status     complete / running / stopped from the writer lock; shards in progress
    reader     open_run -> RunReader, indexed by global sample index, reading only what is asked
    verify     verify_run: one verdict (OK / INCOMPLETE / FAILED), and --repair

The store imports nothing from the rest of fastattr except fastattr.errors (only numpy and h5py
besides), so tools and tests can load it without torch.
"""

from __future__ import annotations

from ..errors import CorruptShardError, RunMismatchError, StoreError
from .block import Block
from .reader import RunReader, open_run
from .schema import SCHEMA_VERSION, STAT_FIELDS
from .schema import STAT_KEYS as STAT_KEYS  # explicit re-exports outside __all__ (fastattr.runner uses these)
from .schema import VOLATILE_CONFIG_KEYS as VOLATILE_CONFIG_KEYS
from .verify import VerifyReport, verify_run
from .writer import RunWriter

__all__ = [
    "SCHEMA_VERSION",
    "STAT_FIELDS",
    "Block",
    "CorruptShardError",
    "RunMismatchError",
    "RunReader",
    "RunWriter",
    "StoreError",
    "VerifyReport",
    "open_run",
    "verify_run",
]
