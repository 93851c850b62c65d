"""What a run's data fingerprint costs (fastattr/fingerprints.py): the full-content hash of
arrays, memory-mapped .npy and HDF5 data, and the strided sample of a Dataset.

    python benchmarks/bench_fingerprint.py --big-gib 4 --json benchmarks/results/fingerprint.json

Cases: 10k x 3x32x32 float32 in memory, as .npy (page cache warm and evicted with
posix_fadvise(DONTNEED), so read from disk), as HDF5 (uncompressed and lzf), as a
TensorDataset (strided); and one large memory-mapped .npy (--big-gib) warm and evicted.
Each time is the best of --repeats (benchmarks/_harness.py's best_of); sha256 alone over the
same bytes is shown for scale. The JSON records the card, date and commit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402

from fastattr.sources import open_source  # noqa: E402


def evict(path: Path) -> None:
    """Drop one file's pages from the page cache (only this file), so the next read is from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-gib", type=float, default=4.0, help="size of the large memory-mapped .npy (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows: list[dict] = []
    print(h.env_line(h.env()), flush=True)

    def add(case: str, nbytes: int, timing: h.Timing, kind: str) -> None:
        seconds = timing.seconds
        rows.append({"case": case, "bytes": nbytes, "seconds": round(seconds, 4), "GB/s": round(nbytes / seconds / 1e9, 2), "kind": kind})
        print(f"{case:<48} {nbytes / 2**20:9.1f} MiB {seconds:8.3f} s {nbytes / seconds / 1e9:6.2f} GB/s  {kind}", flush=True)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        x = np.random.default_rng(0).standard_normal((10_000, 3, 32, 32)).astype(np.float32)
        add("sha256 alone, 10k x 3x32x32 in memory", x.nbytes, h.best_of(lambda: hashlib.sha256(x).digest(), "cpu", args.repeats), "-")
        src = open_source(x)
        add("array in memory", x.nbytes, h.best_of(src.fingerprint, "cpu", args.repeats), src.fingerprint()["kind"])
        np.save(d / "x.npy", x)
        src = open_source(str(d / "x.npy"))
        add(".npy memory-mapped, page cache warm", x.nbytes, h.best_of(src.fingerprint, "cpu", args.repeats), "full")
        del src  # unmapped, so its pages can be evicted
        cold = lambda p: open_source(str(p)).fingerprint()  # noqa: E731 - a fresh mapping each time
        add(".npy memory-mapped, evicted (from disk)", x.nbytes, h.best_of(lambda: cold(d / "x.npy"), "cpu", args.repeats, lambda: evict(d / "x.npy")), "full")
        for comp in (None, "lzf"):
            with h5py.File(d / f"x-{comp}.h5", "w") as f:
                f.create_dataset("x", data=x, chunks=(64, 3, 32, 32), compression=comp)
            src = open_source(f"{d / f'x-{comp}.h5'}:x")
            add(f"HDF5 {comp or 'uncompressed'}, chunks of 64 samples", x.nbytes, h.best_of(src.fingerprint, "cpu", args.repeats), "full")
        ds = torch.utils.data.TensorDataset(torch.from_numpy(x))
        src = open_source(ds)
        add("TensorDataset (strided sample)", x.nbytes, h.best_of(src.fingerprint, "cpu", args.repeats), src.fingerprint()["kind"])
        if args.big_gib > 0:
            n = int(args.big_gib * 2**30 // (3 * 64 * 64 * 4))
            big = np.lib.format.open_memmap(d / "big.npy", mode="w+", dtype=np.float32, shape=(n, 3, 64, 64))
            for s in range(0, n, 4096):
                big[s : s + 4096] = np.random.default_rng(s).standard_normal((min(4096, n - s), 3, 64, 64), dtype=np.float32)
            big.flush()
            del big
            nbytes = n * 3 * 64 * 64 * 4
            add(f"large .npy {n} x 3x64x64, evicted (from disk)", nbytes, h.best_of(lambda: cold(d / "big.npy"), "cpu", 1, lambda: evict(d / "big.npy")), "full")
            add(f"large .npy {n} x 3x64x64, page cache warm", nbytes, h.best_of(lambda: cold(d / "big.npy"), "cpu", 1), "full")
    if args.json:
        h.write_json(args.json, {"cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
