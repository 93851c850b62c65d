"""The store's speed: which compression to default to, and whether a dataset run keeps up.

``compression``: on real attributions (the demo CNN's IG, a ResNet-18's IG at 224x224, a token
model's LayerIG on its embeddings), the ratio (raw / stored bytes) and the encode rate (raw MB/s)
of: h5py's own lzf and gzip filters (one thread, inside h5py's lock: what a single writer does) and
fastattr's parallel shuffle + deflate (store/encode.py: one chunk per task in the thread pool), at
several levels, and no compression.

``dataset``: saliency over 3x224x224 inputs through a near-free model (the store is the bottleneck):
fastattr.run (auto = the default, lzf, gzip = the parallel encoder, none) against a plain loop that computes the same
saliency with torch in batches of 64 and writes it with h5py from one thread (lzf, one sample per
chunk, fletcher32, fsync and sha256 like a shard). Every output is read back with plain h5py.

``writer``: RunWriter alone on prepared blocks (no model): MB/s from the first put to close().

``reductions``: what storage_dtype="float16" and channel_reduce="sum" save on image attributions
(ResNet-18 IG at 3x224x224, random init with BatchNorm statistics, Gaussian inputs): end-to-end
fastattr.run per setting (bytes on disk, run time), the store alone writing the same real
attributions tiled to --write-samples rows (reduction included, finalize + fsync + sha256), and the
error of float16 storage against float32 (relative L2, max abs). ``--device cuda``: the runs and the
storage form on the GPU, the store-only timing then includes the device-to-host copy.

    python benchmarks/bench_store.py compression
    python benchmarks/bench_store.py dataset --samples 1024
    python benchmarks/bench_store.py dataset --samples 1536 --shard-size 256   # several shards: commits overlap writes
    python benchmarks/bench_store.py writer --samples 1024 --shard-size 256      # the writer alone, no model
    python benchmarks/bench_store.py reductions --samples 16 --write-samples 256 [--device cuda]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings

import h5py
import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
import models  # noqa: E402

import fastattr  # noqa: E402
from fastattr.store import encode  # noqa: E402

warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------- compression choice


def attributions() -> dict[str, np.ndarray]:
    """Real attributions, float32, one row per sample."""
    from fastattr import demo

    torch.manual_seed(0)
    out = {}
    model = demo.trained_model(train_samples=1000)
    images, _, _ = demo.make_dataset(64, seed=1)
    out["demo CNN IG-32"] = (
        fastattr.IntegratedGradients(model)
        .attribute(images, target=model(images).argmax(1), n_steps=32)
        .detach()
        .numpy()
    )
    cnn = models.ResNet18().eval()
    x = torch.randn(8, 3, 224, 224)
    out["ResNet-18 IG-8 224"] = fastattr.IntegratedGradients(cnn).attribute(x, target=0, n_steps=8).detach().numpy()
    tok = models.TokenClassifier(max_len=128)
    ids, mask, _ = models.token_batch(64, 128)
    lig = fastattr.LayerIntegratedGradients(tok, tok.embed)
    out["token LayerIG-16 emb"] = (
        lig.attribute(ids, target=0, n_steps=16, additional_forward_args=(mask,)).detach().numpy()
    )
    return out


def h5py_rate(a: np.ndarray, chunk_rows: int, **filters) -> tuple[float, float]:
    """(raw MB/s, ratio) writing a through h5py's own filters (one thread) with fletcher32."""
    path = tempfile.mktemp(suffix=".h5")
    try:
        t = time.perf_counter()
        with h5py.File(path, "w") as f:
            f.create_dataset("a", data=a, chunks=(chunk_rows, *a.shape[1:]), fletcher32=True, **filters)
        seconds = time.perf_counter() - t
        return a.nbytes / seconds / 1e6, a.nbytes / os.path.getsize(path)
    finally:
        os.unlink(path)


def pool_rate(a: np.ndarray, chunk_rows: int, level: int) -> tuple[float, float, float]:
    """(raw MB/s one thread, raw MB/s through the pool, ratio) of store/encode.py's encoder."""
    chunks = [a[i : i + chunk_rows] for i in range(0, len(a), chunk_rows)]
    t = time.perf_counter()
    size = sum(len(encode.encode_chunk(c, level)) for c in chunks)
    one = a.nbytes / (time.perf_counter() - t) / 1e6
    t = time.perf_counter()
    list(encode.pool().map(lambda c: encode.encode_chunk(c, level), chunks))
    many = a.nbytes / (time.perf_counter() - t) / 1e6
    return one, many, a.nbytes / size


def compression(args: argparse.Namespace) -> tuple[list[str], list[list]]:
    from fastattr.store.schema import AUTO_MIN_RATIO, AUTO_PROBE_BYTES, CHUNK_TARGET_BYTES, GZIP_LEVEL

    rows = []
    for name, a in attributions().items():
        # the shard's chunking (rows per chunk for 256 KiB); tile the rows to a few MB so timings mean something
        chunk_rows = max(1, CHUNK_TARGET_BYTES // (a[0].nbytes))
        reps = max(1, int(np.ceil(8e6 / a.nbytes)))
        data = np.ascontiguousarray(np.concatenate([a] * reps)) if reps > 1 else a
        for label, kw in (("none (h5py)", {}), ("lzf (h5py)", {"compression": "lzf"}), ("gzip 4 (h5py)", {"compression": "gzip", "compression_opts": 4}),
                          ("shuffle+gzip 1 (h5py)", {"compression": "gzip", "compression_opts": 1, "shuffle": True})):  # fmt: skip
            mbs, ratio = h5py_rate(data, chunk_rows, **kw)
            rows.append([name, label, f"{ratio:.2f}", f"{mbs:.0f}", "-"])
        for level in args.levels:
            one, many, ratio = pool_rate(data, chunk_rows, level)
            rows.append(
                [
                    name,
                    f"shuffle+gzip {level}, planes (fastattr pool)",
                    f"{ratio:.2f}",
                    f"{one:.0f}",
                    f"{many:.0f} ({encode.workers()} threads)",
                ]
            )
        # what compression="auto" picks for a shard of these rows (its estimate on a sample of the first block)
        est = encode.deflate_ratio(a[:64], GZIP_LEVEL, AUTO_PROBE_BYTES)
        choice = "gzip" if est >= AUTO_MIN_RATIO else "none"
        rows.append([name, f"auto -> {choice} (estimate on {AUTO_PROBE_BYTES // 1024} KiB)", f"{est:.2f}", "-", "-"])
        print(
            h.markdown(
                ["attributions", "encoding", "ratio", "MB/s 1 thread", "MB/s pool"], rows[-(5 + len(args.levels)) :]
            ),
            flush=True,
        )
    return ["attributions", "encoding", "ratio", "MB/s 1 thread", "MB/s pool"], rows


# --------------------------------------------------------------------------- store-bound dataset run


class NearFree(nn.Module):
    """A model that costs almost nothing: a per-pixel scale and a 10-way linear head on the channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, 1, 1))
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x * self.scale).mean((2, 3)))  # varying gradients, like real ones


def plain_loop(model: nn.Module, data: np.ndarray, path: str) -> None:
    """torch saliency in batches of 64, h5py from one thread: lzf, one sample per chunk, fletcher32, fsync, sha256."""
    n = len(data)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "attr", shape=data.shape, dtype=np.float32, chunks=(1, *data.shape[1:]), compression="lzf", fletcher32=True
        )
        for start in range(0, n, 64):
            x = torch.from_numpy(np.array(data[start : start + 64])).requires_grad_(True)
            out = model(x)
            target = out.argmax(1)
            (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
            ds[start : start + len(x)] = g.abs().numpy()
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    hashlib.sha256(open(path, "rb").read()).hexdigest()


def read_back(paths: list[str], n: int) -> None:
    """Every sample read with plain h5py (fletcher32 checked on each chunk)."""
    rows = 0
    for p in paths:
        with h5py.File(p, "r") as f:
            a = f["attr"] if "attr" in f else f["attributions"][next(iter(f["attributions"]))]
            for i in range(0, len(a), 256):
                rows += len(a[i : i + 256])
    assert rows == n, (rows, n)


def dataset(args: argparse.Namespace) -> tuple[list[str], list[list]]:
    torch.manual_seed(0)
    model = NearFree().eval()
    tmp = tempfile.mkdtemp(prefix="fastattr-bench-store-")
    rows = []
    try:
        np.save(
            os.path.join(tmp, "x.npy"),
            np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32),
        )
        data = np.load(os.path.join(tmp, "x.npy"), mmap_mode="r")
        for comp in args.compressions:  # warm-up: allocator, the encode pool, first-call costs
            fastattr.run(model, data[:128], os.path.join(tmp, f"warm-{comp}"), "saliency", progress=False, compression=comp)
        cases = [("plain loop (torch + h5py lzf, 1 thread)", None)] + [
            (f"fastattr.run compression={c}", c) for c in args.compressions
        ]
        for _ in range(args.repeats):
            for label, comp in cases:
                out = os.path.join(tmp, "out")
                shutil.rmtree(out, ignore_errors=True)
                if comp is None:
                    os.makedirs(out)
                    p = os.path.join(out, "attr.h5")
                    seconds, _, _ = h.measure_once(lambda p=p: plain_loop(model, data, p), "cpu", memory_on=None)
                    paths = [p]
                else:
                    seconds, _, _ = h.measure_once(
                        lambda out=out, comp=comp: fastattr.run(
                            model, data, out, "saliency", progress=False, compression=comp, shard_size=args.shard_size
                        ),
                        "cpu",
                        memory_on=None,
                    )
                    paths = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".h5"))
                disk = sum(os.path.getsize(p) for p in paths)
                read_back(paths, args.samples)
                rows.append(
                    [
                        label,
                        args.samples,
                        f"{seconds:.2f}",
                        f"{args.samples / seconds:.0f}",
                        f"{data[0].nbytes * args.samples / seconds / 1e6:.0f}",
                        f"{disk / 1e6:.0f}",
                    ]
                )
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ["implementation", "samples", "time (s)", "samples/s", "raw MB/s", "on disk (MB)"], rows


# --------------------------------------------------------------------------- storage reductions

REDUCTIONS = [("float32", None), ("float16", None), ("float32", "sum"), ("float16", "sum")]


def _stored(out: str) -> tuple[np.ndarray, int]:
    """A run's attributions (as float32, global order) and its shards' bytes on disk."""
    with fastattr.open(out, dtype="float32") as store:
        a = store[:]["attributions"]["x"]
    return a, sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".h5"))


def _write(a: torch.Tensor, out: str, storage_dtype: str, reduce: str | None, compression: str, device_cast: bool = True) -> None:
    """The store alone, as a run feeds it: the run's device-side form (channel reduction, float16 cast:
    fastattr/run_reduce.py; here on the CPU) then RunWriter, 64 samples a block. device_cast=False:
    float32 blocks, the writer thread casts with numpy (what runs did before the cast moved)."""
    from fastattr.run_reduce import StoredForm
    from fastattr.store import Block, RunWriter

    form = StoredForm(reduce, storage_dtype == "float16" and device_cast)
    n = len(a)
    zeros = np.zeros(64, np.float32)
    with RunWriter(out, config={"method": "bench"}, total=n, storage_dtype=storage_dtype, compression=compression) as w:
        for lo in range(0, n, 64):
            hi = min(n, lo + 64)
            part, _ = form.apply(a[lo:hi])
            z = zeros[: hi - lo]
            stats = {"sum": z, "l1": z, "l2": z, "absmax": z, "nonfinite": np.zeros(hi - lo, np.int32)}
            w.put(Block(lo, hi, {"x": part.cpu().numpy()}, np.zeros(hi - lo, np.int64), z, z, z, np.full(hi - lo, 8, np.int32), stats))


def reductions(args: argparse.Namespace) -> tuple[list[str], list[list]]:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = models.randomize_batchnorm(models.ResNet18().eval()).to(dev)
    x = torch.randn(args.samples, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    raw = x[0].numel() * 4  # float32 bytes of one full attribution
    tmp = tempfile.mkdtemp(prefix="fastattr-bench-reduce-")
    rows, stored = [], {}
    try:
        for dtype, reduce in REDUCTIONS:  # end to end: fastattr.run, model compute included
            out = os.path.join(tmp, f"run-{dtype}-{reduce}")
            seconds, _, _ = h.measure_once(lambda out=out, dtype=dtype, reduce=reduce: fastattr.run(
                model, x.numpy(), out, target=0, n_steps=args.steps, progress=False, storage_dtype=dtype, channel_reduce=reduce,
                compression=args.compression, device=dev), dev, memory_on=None)  # fmt: skip
            stored[dtype, reduce], disk = _stored(out)
            rows.append([f"fastattr.run IG-{args.steps}", dtype, reduce or "-", args.compression, args.samples, f"{seconds:.1f}",
                         f"{args.samples / seconds:.2f}", f"{disk / args.samples / 1e3:.0f}", "-", "-"])  # fmt: skip
            print(rows[-1], flush=True)
        full = torch.from_numpy(stored["float32", None])
        tiled = full.repeat(-(-args.write_samples // len(full)), 1, 1, 1)[: args.write_samples].contiguous().to(dev)  # the form is made where the run makes it
        for comp in args.write_compressions:  # the store alone, on the same real attributions
            for dtype, reduce, device_cast in [*((d, r, True) for d, r in REDUCTIONS), ("float16", None, False)]:
                out = os.path.join(tmp, f"write-{comp}-{dtype}-{reduce}-{device_cast}")
                best = min(h.measure_once(lambda out=out, dtype=dtype, reduce=reduce, comp=comp, dc=device_cast: (
                    shutil.rmtree(out, ignore_errors=True), _write(tiled, out, dtype, reduce, comp, dc)), dev, memory_on=None).seconds
                    for _ in range(args.repeats))  # fmt: skip
                disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".h5"))
                n = args.write_samples
                label = "store only (RunWriter)" if device_cast else "store only, numpy cast in the writer (old path)"
                rows.append([label, dtype, reduce or "-", comp, n, f"{best:.2f}", f"{n / best:.0f}", f"{disk / n / 1e3:.0f}",
                             f"{disk / best / 1e6:.0f}", f"{raw * n / best / 1e6:.0f}"])  # fmt: skip
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for reduce in (None, "sum"):  # float16 storage against float32, same run otherwise
        ref, got = stored["float32", reduce].astype(np.float64), stored["float16", reduce].astype(np.float64)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        worst = np.abs(got - ref).max()
        scale = np.abs(ref).reshape(len(ref), -1).max(1).mean()
        print(f"float16 vs float32 ({reduce or 'full'}): relative L2 {rel:.2e}, max abs {worst:.2e} "
              f"(mean per-sample absmax {scale:.2e}, max abs / absmax {worst / scale:.2e})")  # fmt: skip
    headers = ["path", "storage_dtype", "channel_reduce", "compression", "samples", "time (s)", "samples/s", "KB/sample on disk",
               "stored MB/s", "full-fp32 MB/s"]  # fmt: skip
    return headers, rows


# --------------------------------------------------------------------------- the writer alone


def writer(args: argparse.Namespace) -> tuple[list[str], list[list]]:
    """RunWriter alone: prepared blocks of 3x224x224 float32 rows (distinct values) put as fast as it
    takes them, shards of --shard-size rows, best of --repeats from the first put to close()
    (every shard sealed, fsynced, hashed and listed). What the store absorbs with no model."""
    from fastattr.store import Block, RunWriter

    per_block = 64
    rng = np.random.default_rng(0)
    base = rng.standard_normal((per_block, 3, 224, 224)).astype(np.float32)
    z = np.zeros(per_block, np.float32)
    stats = {"sum": z, "l1": z, "l2": z, "absmax": z, "nonfinite": np.zeros(per_block, np.int32)}
    blocks = [
        Block(s, s + per_block, {"x": base + s}, np.zeros(per_block, np.int64), z, z, z, np.ones(per_block, np.int32), stats)
        for s in range(0, args.samples // per_block * per_block, per_block)
    ]
    n = len(blocks) * per_block
    rows = []
    tmp = tempfile.mkdtemp(prefix="fastattr-bench-writer-")
    try:
        for comp in args.compressions:
            best = float("inf")
            for _ in range(args.repeats):
                out = os.path.join(tmp, "run")
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                with RunWriter(out, config={"bench": 1}, total=n, shard_rows=args.shard_size, compression=comp) as w:
                    for b in blocks:
                        w.put(b)
                best = min(best, time.perf_counter() - t0)
            rows.append([comp, n, args.shard_size, encode.workers(), f"{best:.2f}", f"{n * base[0].nbytes / best / 1e6:.0f}"])
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ["compression", "samples", "shard rows", "encode threads", "best time (s)", "MB/s"], rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compression")
    c.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    d = sub.add_parser("dataset")
    d.add_argument("--samples", type=int, default=1024)
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--shard-size", type=int, default=4096, help="samples per shard of the fastattr runs (the run's default: 4096)")
    d.add_argument("--compressions", type=lambda s: s.split(","), default=["auto", "lzf", "gzip", "none"])
    wr = sub.add_parser("writer")
    wr.add_argument("--samples", type=int, default=1024)
    wr.add_argument("--shard-size", type=int, default=256)
    wr.add_argument("--repeats", type=int, default=3)
    wr.add_argument("--compressions", type=lambda s: s.split(","), default=["none", "gzip"])
    r = sub.add_parser("reductions")
    r.add_argument("--samples", type=int, default=16, help="samples of the end-to-end runs (ResNet-18 IG at 224)")
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--compression", default="lzf", help="of the end-to-end runs")
    r.add_argument("--write-samples", type=int, default=256, help="rows written in the store-only part")
    r.add_argument("--write-compressions", type=lambda s: s.split(","), default=["lzf", "gzip", "none"])
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--device", default="cpu", help="where the runs and the storage form (reduction, float16 cast) run; cuda on a GPU")
    for p in (c, d, wr, r):
        p.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    headers, rows = {"compression": compression, "dataset": dataset, "writer": writer, "reductions": reductions}[args.what](args)
    env = h.env_line(h.env(getattr(args, "device", "cpu")))
    print(f"\n{env}, {h.commit()}\n\n" + h.markdown(headers, rows))
    if args.json:
        h.write_json(args.json, {"env_line": env, "args": vars(args), "headers": headers, "rows": rows}, getattr(args, "device", "cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
