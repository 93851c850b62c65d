"""Scale-out: fastattr.run throughput at 1 and K ranks under torchrun, and equality of the stores.

    python benchmarks/bench_distributed.py --device cuda --ranks 1,8          # one node with 8 GPUs
    python benchmarks/bench_distributed.py --device cpu --ranks 1,2 --samples 512 --steps 8   # smoke test

For each rank count K the driver launches ``torchrun --standalone --nproc_per_node=K`` on this
script's worker mode, which runs fastattr.run (integrated gradients, fp32 unless --precision) on
the same memory-mapped data into a fresh run directory; rank 0 reports the job's wall time and
samples/s (from the first batch to the merged manifest, so startup and model loading are not
counted, the merge is). The driver then checks each K-rank store against the 1-rank store
(index/target exactly, attributions max |diff|) and with verify_run, and writes the results as
JSON with the scaling efficiency throughput(K) / (K * throughput(1)).

Needs K devices for a meaningful number: on CPU every rank shares the same cores, so the CPU mode
only checks that the launch and the comparison work. Not measured yet on a multi-GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One rank: the model from benchmarks/models.py, the shared .npy, one fastattr.run."""
    import models
    import torch

    import fastattr
    from fastattr.distributed import local_device

    device = local_device(torch.device(args.device))  # cuda -> cuda:LOCAL_RANK: one GPU per rank
    torch.manual_seed(0)
    model = models.randomize_batchnorm(models.small_cnn()).eval().to(device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    summary = fastattr.run(model, args.data, args.out, method="integrated_gradients", n_steps=args.steps, target="predicted", precision=args.precision,
                           device=device, storage_dtype="float16", progress=False)  # fmt: skip
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps({"computed": summary.computed, "seconds": summary.seconds, "throughput": summary.throughput, "complete": summary.complete}), flush=True)


def launch(ranks: int, args: argparse.Namespace, data: str, out: str) -> dict:
    # torchrun as a module of this interpreter: a venv's bin/ need not be on PATH
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", os.path.abspath(__file__), "--worker",
           "--data", data, "--out", out, "--device", args.device, "--steps", str(args.steps), "--precision", args.precision]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"torchrun with {ranks} ranks failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return {"ranks": ranks, **json.loads(line[len("RESULT ") :]), "launch_wall_s": wall}


def compare(a_dir: str, b_dir: str) -> dict:
    import fastattr
    from fastattr.store import verify_run

    a, b = fastattr.open(a_dir), fastattr.open(b_dir)
    out = {"verify_ok": verify_run(b_dir).ok, "index_equal": bool(np.array_equal(a.indices, b.indices)), "max_abs_diff": 0.0}
    out["target_equal"] = bool(np.array_equal(a.field("target"), b.field("target")))
    scale = 0.0
    for start in range(0, a.total, 4096):  # by global index: the two stores cut shards differently
        stop = min(a.total, start + 4096)
        p, q = a[start:stop]["attributions"]["x"].astype(np.float32), b[start:stop]["attributions"]["x"].astype(np.float32)
        out["max_abs_diff"] = max(out["max_abs_diff"], float(np.abs(p - q).max()))
        scale = max(scale, float(np.abs(p).max()))
    out["scale"] = scale
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts (default: 1 and every visible GPU)")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON results file (worker mode: the run directory)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    if args.ranks:
        counts = [int(k) for k in args.ranks.split(",")]
    else:
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        if gpus < 2:
            print(f"{gpus} GPU(s) visible: scaling needs at least 2 (or pass --ranks with --device cpu for a smoke test)")
            return 2
        counts = [1, gpus]
    if args.device == "cuda" and max(counts) > torch.cuda.device_count():
        print(f"--ranks {max(counts)} but only {torch.cuda.device_count()} GPUs are visible")
        return 2
    work = tempfile.mkdtemp(prefix="fastattr-dist-")
    try:
        data = os.path.join(work, "x.npy")
        np.save(data, np.random.default_rng(0).standard_normal((args.samples, 3, 32, 32)).astype(np.float32))
        rows = []
        for k in counts:
            row = launch(k, args, data, os.path.join(work, f"run-{k}"))
            rows.append(row)
            print(f"{k} ranks: {row['computed']} samples in {row['seconds']:.2f} s = {row['throughput']:,.0f} samples/s", flush=True)
        base = next((r for r in rows if r["ranks"] == 1), None)
        for r in rows:
            if base is not None and r is not base:
                r["speedup"] = r["throughput"] / base["throughput"]
                r["efficiency"] = r["speedup"] / r["ranks"]
                r["vs_1_rank"] = compare(os.path.join(work, "run-1"), os.path.join(work, f"run-{r['ranks']}"))
                print(f"{r['ranks']} ranks: speedup {r['speedup']:.2f}x, efficiency {r['efficiency']:.0%}, store vs 1 rank: {r['vs_1_rank']}", flush=True)
        meta = {"samples": args.samples, "steps": args.steps, "precision": args.precision, "model": "small_cnn 3x32x32"}
        if args.out:
            h.write_json(args.out, {"meta": meta, "rows": rows}, args.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
