"""What the store's integrity costs and buys (issue 13): schema 2's per-chunk fletcher32 checksums,
HDF5 1.10 format and marker against schema 1's plain layout, the recount of non-finite values at
the store boundary, the full check (sha256 + structure of every listed shard) a resume runs, and
what a plain read (no sha256) makes of single flipped bits in a small shard of either layout.

    python benchmarks/bench_store_integrity.py                      # 256 MiB written per variant, 1 GiB resume check
    python benchmarks/bench_store_integrity.py --write-mb 64 --resume-mb 256

Write variants go through RunWriter (the real path; the schema-1 layout is reproduced by patching
the shard module): MiB/s from the first put to close(), bytes on disk, MiB/s reading everything
back with RunReader.iter_batches. Attribution rows are 3x64x64 float32, smooth values plus noise
(lzf compresses them about as much as real attribution maps). The page cache is warm throughout:
on a cold cache a resume check reads at disk speed instead. Times are benchmarks/_harness.py's
measure_once (one call each); the output starts with the card, date and commit, and the JSON has them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from fastattr.store import Block, RunWriter, open_run  # noqa: E402
from fastattr.store import shard as shard_mod  # noqa: E402
from fastattr.store.integrity import check_shards  # noqa: E402
from fastattr.store.manifest import read_manifest  # noqa: E402

SHAPE = (3, 64, 64)
ROW_BYTES = int(np.prod(SHAPE)) * 4
CONFIG = {"method": "integrated_gradients", "bench": True}


def rows_block(rng: np.random.Generator, start: int, stop: int) -> Block:
    n = stop - start
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    smooth = np.sin(xx / 9.0) * np.cos(yy / 7.0)
    a = (smooth[None, None] * rng.standard_normal((n, 3, 1, 1)).astype(np.float32) + rng.standard_normal((n, *SHAPE)).astype(np.float32) * 0.05).astype(np.float32)
    f = np.arange(start, stop, dtype=np.float32)
    z = np.zeros(n, np.float32)
    return Block(start, stop, {"x": a}, np.zeros(n, np.int64), f, z, z, np.full(n, 8, np.int32), {"sum": f, "l1": f, "l2": f, "absmax": f, "nonfinite": np.zeros(n, np.int32)})


@contextlib.contextmanager
def schema1_layout():
    """The shard module writing schema 1's layout: default HDF5 format, no user block / marker,
    no fletcher32."""
    saved = shard_mod.SHARD_LIBVER, shard_mod.USERBLOCK_SIZE, shard_mod.SCHEMA_VERSION, shard_mod.OpenShard.open_marker, h5py.Group.create_dataset
    original = h5py.Group.create_dataset

    def create_dataset(self, name, *args, **kw):
        kw.pop("fletcher32", None)
        return original(self, name, *args, **kw)

    shard_mod.SHARD_LIBVER, shard_mod.USERBLOCK_SIZE, shard_mod.SCHEMA_VERSION = ("earliest", "latest"), 0, 1
    shard_mod.OpenShard.open_marker = lambda self: None
    h5py.Group.create_dataset = create_dataset
    try:
        yield
    finally:
        shard_mod.SHARD_LIBVER, shard_mod.USERBLOCK_SIZE, shard_mod.SCHEMA_VERSION, shard_mod.OpenShard.open_marker, h5py.Group.create_dataset = saved


@contextlib.contextmanager
def no_recount():
    """Skip the store's non-finite recount (to measure what it costs)."""
    saved = shard_mod.nonfinite_rows
    shard_mod.nonfinite_rows = lambda a: np.zeros(a.shape[0], dtype=np.int64)
    try:
        yield
    finally:
        shard_mod.nonfinite_rows = saved


def seconds(fn) -> float:
    """Wall time of one call of ``fn`` (the harness's clock; no memory sampling)."""
    return h.measure_once(fn, "cpu", memory_on=None).seconds


def write_run(run: Path, mb: int, compression: str, seed: int = 0) -> float:
    total = max(1, mb * 2**20 // ROW_BYTES)
    rng = np.random.default_rng(seed)
    blocks = [rows_block(rng, a, min(a + 256, total)) for a in range(0, total, 256)]  # made before the clock starts

    def write() -> None:
        with RunWriter(run, config=CONFIG, total=total, shard_rows=4096, compression=compression) as w:
            for b in blocks:
                w.put(b)

    return seconds(write)


def read_all(run: Path) -> float:
    def read() -> None:
        with open_run(run) as r:
            for _ in r.iter_batches(1024):
                pass

    return seconds(read)


def size_of(run: Path) -> int:
    return sum(p.stat().st_size for p in run.glob("shard-*.h5"))


def bench_writes(root: Path, mb: int, repeats: int) -> list[dict]:
    out = []
    variants = [("schema 2", contextlib.nullcontext), ("schema 2, no recount", no_recount), ("schema 1 layout", schema1_layout)]
    for compression in ("lzf", "none"):
        best: dict[str, dict] = {}
        for rep in range(repeats):  # interleaved, best of repeats: the machine is shared
            for name, ctx in variants:
                run = root / f"w-{compression}-{rep}-{name.replace(' ', '_').replace(',', '')}"
                with ctx():
                    wt = write_run(run, mb, compression)
                rt = read_all(run)
                rec = {"variant": name, "compression": compression, "write_MiBps": mb / wt, "read_MiBps": mb / rt, "bytes": size_of(run)}
                old = best.get(name)
                best[name] = rec if old is None else {**rec, "write_MiBps": max(old["write_MiBps"], rec["write_MiBps"]), "read_MiBps": max(old["read_MiBps"], rec["read_MiBps"])}
                shutil.rmtree(run)
        out.extend(best.values())
    return out


def bench_resume(root: Path, mb: int) -> dict:
    run = root / "resume"
    write_run(run, mb, "none")
    man = read_manifest(run / "manifest.json")
    size = size_of(run)

    def sha256_first_shard() -> None:
        digest = hashlib.sha256()
        with open(run / man["shards"][0].file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)

    one = (run / man["shards"][0].file).stat().st_size / seconds(sha256_first_shard)
    structure = seconds(lambda: check_shards(run, man["shards"], checksum=False))
    full = seconds(lambda: check_shards(run, man["shards"]))
    resume = seconds(lambda: RunWriter(run, config=CONFIG, total=man["total"], shard_rows=4096).close())  # the whole resume open
    return {
        "bytes": size,
        "shards": len(man["shards"]),
        "sha256_one_thread_MiBps": one / 2**20,
        "structure_only_s": structure,
        "check_all_s": full,
        "check_all_MiBps": size / 2**20 / full,
        "resume_open_s": resume,
        "threads": min(len(man["shards"]), os.cpu_count() or 1, 8),
    }


def bench_flips(root: Path, layout) -> dict:
    """Flip one bit at ~600 evenly spaced offsets of a 40-row shard, one at a time, and read the
    whole run back (open_run + run[:], no sha256): an error, the same values, or silently wrong."""
    run = root / "flips"
    rng = np.random.default_rng(1)
    n = 40
    i = np.arange(n)
    f = i.astype(np.float32)
    blk = Block(0, n, {"x": rng.standard_normal((n, 4, 6)).astype(np.float32)}, i % 3, f, f * 0, f * 0 + 1e-4, np.full(n, 8, np.int32), {"sum": f, "l1": f, "l2": f, "absmax": f, "nonfinite": np.zeros(n, np.int32)})
    with layout(), RunWriter(run, config=CONFIG, total=n, shard_rows=n) as w:
        w.put(blk)

    def read() -> list[np.ndarray]:
        with open_run(run) as r:
            d = r[:]
        return [d["attributions"]["x"], d["target"], d["output"], d["baseline_output"], d["delta"], d["n_steps"], d["index"], *d["stats"].values()]

    ref = read()
    path = run / "shard-00000.h5"
    raw = path.read_bytes()
    counts = {"error": 0, "silently_wrong": 0, "same": 0}
    for pos in range(0, len(raw), max(1, len(raw) // 600)):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            got = read()
        except Exception:
            counts["error"] += 1
            continue
        counts["same" if all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ref, got)) else "silently_wrong"] += 1
    shutil.rmtree(run)
    return {"bytes": len(raw), **counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write-mb", type=int, default=256)
    p.add_argument("--resume-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    info = h.env()
    print(h.env_line(info), flush=True)
    root = Path(tempfile.mkdtemp(prefix="fastattr-bench-", dir=args.dir))
    try:
        logging.disable(logging.WARNING)  # damaged shards log as they are met
        flips = {"schema 2": bench_flips(root, contextlib.nullcontext), "schema 1 layout": bench_flips(root, schema1_layout)}
        logging.disable(logging.NOTSET)
        results = {"env": info, "cpus": os.cpu_count(), "flips": flips, "writes": bench_writes(root, args.write_mb, args.repeats), "resume": bench_resume(root, args.resume_mb)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, fl in results["flips"].items():
        print(f"single-bit flips, {name} ({fl['bytes']} B shard): {fl['error']} errors, {fl['silently_wrong']} silently wrong, {fl['same']} harmless")
    for w in results["writes"]:
        print(f"{w['compression']:>4} {w['variant']:<22} write {w['write_MiBps']:7.1f} MiB/s  read {w['read_MiBps']:7.1f} MiB/s  {w['bytes'] / 2**20:8.1f} MiB on disk")
    r = results["resume"]
    print(
        f"resume check of {r['bytes'] / 2**30:.2f} GiB in {r['shards']} shards ({r['threads']} threads): {r['check_all_s']:.2f} s "
        f"({r['check_all_MiBps']:.0f} MiB/s; structure alone {r['structure_only_s']:.2f} s; sha256 one thread {r['sha256_one_thread_MiBps']:.0f} MiB/s); "
        f"whole resume open {r['resume_open_s']:.2f} s"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
