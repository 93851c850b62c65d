"""The run directory's fixed names and the shard layout of schema 1 (docs/architecture.md).

Constants only: every other store module takes its file names, dtypes and chunk sizes from here.
"""

from __future__ import annotations

import re

import numpy as np

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
FRAGMENT_RE = re.compile(r"manifest\.rank-\d+\.json")
RANK_LOCK_RE = re.compile(r"\.fastattr-writer\.rank-(\d+)\.lock")
SHARD_ID_RE = re.compile(r"-(\d+)\.h5$")
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
