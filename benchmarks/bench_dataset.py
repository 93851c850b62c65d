"""End-to-end dataset runs: fastattr.run vs a plain loop that calls Captum per batch and
saves with numpy, on the same model and memory-mapped data, in one process.

Reports wall time, throughput, peak host memory (RSS above the start, at two dataset
sizes: it must stay flat as the dataset grows) and the share of fastattr's time spent
outside the model's forward/backward, estimated against a bare loop that only runs
forward + one autograd.grad over the same rows in the same chunk size.

    python benchmarks/bench_dataset.py                       # CPU: 10,000 and 20,000 samples
    python benchmarks/bench_dataset.py --device cuda --sizes 20000,40000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from bench_captum import PeakMemory  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore")
EXAMPLES = 256  # samples per Captum call (fastattr.run picks its own examples_per_batch)


def captum_loop(model: torch.nn.Module, data: np.ndarray, out_dir: str, n_steps: int, device: torch.device, ibs: int) -> None:
    """What users run today: per batch, predict, Captum IG with delta, np.save the results."""
    from captum.attr import IntegratedGradients as CaptumIG

    ig = CaptumIG(model)
    for start in range(0, len(data), EXAMPLES):
        x = torch.from_numpy(np.array(data[start : start + EXAMPLES])).to(device)
        with torch.no_grad():
            target = model(x).argmax(1)
        attr, delta = ig.attribute(x, target=target, n_steps=n_steps, internal_batch_size=ibs, return_convergence_delta=True)
        np.save(os.path.join(out_dir, f"attr-{start:08d}.npy"), attr.detach().cpu().numpy())
        np.save(os.path.join(out_dir, f"delta-{start:08d}.npy"), delta.detach().cpu().numpy())


def model_only(model: torch.nn.Module, data: np.ndarray, n_steps: int, device: torch.device, rows: int, precision: str) -> None:
    """The floor: forward + one autograd.grad over every (step, sample) row, in the chunk size
    and memory layout fastattr used, plus the three forward-only rows per sample that any IG
    run with a predicted target and a convergence delta needs (argmax, F(x), F(x0))."""
    policy = fastattr.precision.get_precision(precision)
    total = len(data) * n_steps
    x = torch.randn(rows, *data.shape[1:], device=device)
    if fastattr.engine.use_channels_last(None, device, policy):
        x = x.contiguous(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for start in range(0, total, rows):
            n = min(rows, total - start)
            xi = x[:n].clone().requires_grad_(True)
            with policy.flags(), policy.autocast(device):
                y = model(xi)[:, 0]
            torch.autograd.grad(y, xi, torch.ones_like(y))
        xf = torch.randn(EXAMPLES, *data.shape[1:], device=device)
        with torch.no_grad(), policy.flags():
            for start in range(0, 3 * len(data), EXAMPLES):
                model(xf[: min(EXAMPLES, 3 * len(data) - start)])
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def measure(fn, device: torch.device) -> tuple[float, float]:
    with PeakMemory(torch.device("cpu")) as mem:  # host memory, whatever the device
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, mem.peak / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="10000,20000")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = models.small_cnn().eval().to(device)
    tmp = tempfile.mkdtemp(prefix="fastattr-bench-")
    rows_out = []
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        path = os.path.join(tmp, "data.npy")
        np.save(path, np.random.default_rng(0).standard_normal((max(sizes), 3, 32, 32)).astype(np.float32))
        full = np.load(path, mmap_mode="r")
        # warm-up (allocator, kernels) outside the measurements
        fastattr.run(model, full[:512], os.path.join(tmp, "warm"), n_steps=args.steps, progress=False)
        for n in sizes:
            data = full[:n]
            for precision in args.precisions.split(","):
                out = os.path.join(tmp, f"fa-{n}-{precision}")
                sizes: list[int] = []
                # gradient chunks only (grad mode on): their settled size is the floor's chunk size
                hook = model.register_forward_pre_hook(lambda _m, a, sizes=sizes: sizes.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
                seconds, peak = measure(lambda data=data, out=out, precision=precision: fastattr.run(model, data, out, n_steps=args.steps, precision=precision, progress=False), device)
                hook.remove()
                store = fastattr.open(out)
                assert len(store) == n
                rows = max(set(sizes), key=sizes.count)  # the gradient passes' settled chunk size
                floor, _ = measure(lambda data=data, precision=precision, rows=rows: model_only(model, data, args.steps, device, rows=rows, precision=precision), device)
                rows_out.append({"impl": f"fastattr.run {precision}", "samples": n, "seconds": seconds, "samples_per_s": n / seconds, "peak_host_mb": peak, "outside_model": 1 - floor / seconds, "model_only_s": floor, "rows_per_forward": rows})
                print(rows_out[-1], flush=True)
            out = os.path.join(tmp, f"captum-{n}")
            os.makedirs(out)
            ibs = EXAMPLES if device.type == "cpu" else EXAMPLES * args.steps
            seconds, peak = measure(lambda data=data, out=out, ibs=ibs: captum_loop(model, data, out, args.steps, device, ibs), device)
            rows_out.append({"impl": f"captum loop + np.save (ibs={ibs})", "samples": n, "seconds": seconds, "samples_per_s": n / seconds, "peak_host_mb": peak, "outside_model": None, "model_only_s": None})
            print(rows_out[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["| implementation | samples | time (s) | samples/s | x vs Captum loop | peak host mem (MB) | time outside fwd/bwd |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows_out:
        base = next(b for b in rows_out if b["samples"] == r["samples"] and b["impl"].startswith("captum"))
        share = "-" if r["outside_model"] is None else f"{100 * r['outside_model']:.1f}%"
        lines.append(f"| {r['impl']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_s']:,.0f} | {base['seconds'] / r['seconds']:.2f} | {r['peak_host_mb']:.0f} | {share} |")
    env = f"torch {torch.__version__}, {args.device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads") + f", IG {args.steps} steps, 3x32x32 CNN"
    print(f"\n{env}\n\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
