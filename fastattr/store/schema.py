"""The run directory's fixed names and the shard layout, schema 2 (docs/architecture.md).

Constants only: every other store module takes its file names, dtypes and chunk sizes from here.

Schema 2 keeps schema 1's datasets, dtypes and attributes and adds integrity: every dataset carries
HDF5's fletcher32 checksum per chunk (plain h5py checks it on every read), the file uses the HDF5
1.10 format (checksummed metadata), and a 512-byte user block at the start of the file holds
fastattr's marker (run id, shard id, start, rows written so far). Schema 1 runs stay readable.
"""

from __future__ import annotations

import re

import numpy as np

SCHEMA_VERSION = 2
READ_SCHEMAS = (1, 2)  # manifests and shards this fastattr reads
STAT_FIELDS = ("sum", "l1", "l2", "absmax")  # float32; plus "nonfinite" (int32)
STAT_KEYS = (*STAT_FIELDS, "nonfinite")

MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
# Names starting with OWN_PREFIX are fastattr's own (locks, probes, temporary files, shards being
# written): fastattr may delete such a file without further proof, and never a file outside it
# unless a manifest of the run lists it and the file proves to be a fastattr shard.
OWN_PREFIX = ".fastattr-"
LOCK_NAME = ".fastattr-writer.lock"
# A listed shard that fails its checks on resume (or verify --repair) is renamed to this suffix,
# never deleted: its samples are recomputed and the file is kept for inspection.
CORRUPT_SUFFIX = ".corrupt"
# Distributed runs (torchrun): rank 0 writes manifest.json and holds LOCK_NAME; every other rank
# holds its own lock and lists the shards it finalized in its own fragment until rank 0 merges them.
RANK_LOCK_FORMAT = ".fastattr-writer.rank-{:05d}.lock"
FRAGMENT_FORMAT = "manifest.rank-{:05d}.json"
FRAGMENT_RE = re.compile(r"manifest\.rank-\d+\.json")
RANK_LOCK_RE = re.compile(r"\.fastattr-writer\.rank-(\d+)\.lock")
SHARD_ID_RE = re.compile(r"-(\d+)\.h5$")
PARTIAL_SHARD_RE = re.compile(re.escape(OWN_PREFIX) + r"(.+-\d+\.h5)" + re.escape(PARTIAL_SUFFIX))

# Schema 2 shard files: HDF5 1.10 file format (object headers, chunk indexes and the superblock carry
# checksums; readable by HDF5 >= 1.10), and the user block with fastattr's marker.
SHARD_LIBVER = ("v110", "v110")
USERBLOCK_SIZE = 512
MARKER_MAGIC = b"fastattr-shard\x00\x02"  # 16 bytes
MARKER_FORMAT = "<16s32sqqq"  # magic, run id (32 hex digits), shard id, start, rows written
MARKER_ROWS_OFFSET = 16 + 32 + 8 + 8
# HDF5 filters a shard may use (ids of H5Z): anything else could need a plugin or run foreign code.
ALLOWED_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
STORAGE_DTYPES = ("float32", "float16")
COMPRESSIONS = ("auto", "lzf", "gzip", "none")
GZIP_LEVEL = 1  # shuffle+deflate level 1: within 0.06 of level 4's ratio on real attributions, 20-25% faster (benchmarks/RESULTS.md)
# compression="auto": each shard is "gzip" when shuffle + deflate shrinks a sample of its first block's
# attributions at least this much (raw / stored), else "none". Measured (benchmarks/RESULTS.md, "Store"):
# demo CNN IG 1.65, token LayerIG 2.15 (compressed); ResNet IG at 224 1.14, image saliency 1.21 (stored raw).
AUTO_MIN_RATIO = 1.5
AUTO_PROBE_BYTES = 256 * 1024  # bytes of a block's attributions the choice compresses (a few ms)
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
# compression "none": the encode pool makes the chunks' fletcher32 (numpy, ~0.65-0.9 GB/s a thread)
# when it has at least this many threads; below, HDF5's C filter in the writer thread costs less CPU
# in all (2-core host under load: 295-304 MB/s pooled vs 337-381 MB/s HDF5's, tmp store_ab A/B)
POOL_CHECKSUM_MIN_THREADS = 4
WRITE_CHUNK_CACHE_BYTES = 4 * 1024 * 1024
# Scalar datasets: 16384 rows (64 KiB of float32) per chunk keeps field() reads to a few chunks.
SCALAR_CHUNK_ROWS = 16384

# Config keys that change from one launch of the same run to the next and so must not block a
# resume (compared at any depth). Callers can replace the set with RunWriter(volatile_keys=...).
VOLATILE_CONFIG_KEYS = frozenset(
    {"created", "updated", "started", "finished", "time", "times", "timing", "timings", "elapsed", "wall_s", "host", "hostname", "pid"}
)
# ... plus those of fastattr.run's config: settings that change shard boundaries, filters or what is
# counted, never the stored values. A manifest lists its writer's keys beyond VOLATILE_CONFIG_KEYS
# ("volatile_keys"); this is the set assumed for a manifest that lists none.
RUN_VOLATILE_KEYS = VOLATILE_CONFIG_KEYS | {"versions", "shard_size", "shard_seconds", "allow_nonfinite", "precision_probe", "compression"}
