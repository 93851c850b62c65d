"""The one GPU call: correctness first, then every timing, in a single run.

    python benchmarks/gpu_suite.py --out DIR

1. Engine correctness on CUDA: fastattr vs Captum (same device, fp32) for every method and
   rule, the Triton kernel path vs the torch reference path, mixed-precision error.
2. Triton kernels: benchmarks/bench_kernels.py (GPU correctness + bandwidth).
3. fastattr vs Captum: benchmarks/bench_captum.py on CUDA (MLP, CNN, ResNet-18 224x224).
4. The gradient family on CUDA: bench_noise.py (SmoothGrad over IG, GradientShap, incl. the
   out-of-memory contrast) and bench_layer.py (LayerIG on a token classifier).
5. Scale-out: bench_distributed.py at 1 and K ranks when K > 1 GPUs are visible (skipped on one).
Each stage's results go to DIR as JSON, and a markdown summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_captum  # noqa: E402
import bench_kernels  # noqa: E402
import models  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore")


def engine_checks(device: str = "cuda") -> list[dict]:
    from captum import attr as ca

    dev = torch.device(device)
    torch.backends.cudnn.allow_tf32 = False  # Captum's side in true fp32, like fastattr's fp32 policy
    rows = []
    torch.manual_seed(0)
    cnn = models.randomize_batchnorm(models.small_cnn()).eval().to(dev)
    mlp = models.mlp().eval().to(dev)
    for name, model, shape in (("mlp", mlp, (64,)), ("cnn", cnn, (3, 32, 32))):
        x = torch.randn(37, *shape, device=dev)
        t = torch.randint(0, 10, (37,), device=dev)
        for rule in fastattr.RULES[:-1]:  # Captum's rules
            a, d = fastattr.IntegratedGradients(model).attribute(x, target=t, method=rule, n_steps=24, return_convergence_delta=True, internal_batch_size=101)
            b, e = ca.IntegratedGradients(model).attribute(x, target=t, method=rule, n_steps=24, return_convergence_delta=True)
            rows.append({"check": f"{name} IG {rule} vs captum", "rel_l2": ((a - b).norm() / b.norm()).item(), "max_abs_diff": (a - b).abs().max().item(), "delta_diff": (d - e).abs().max().item(), "scale": b.abs().max().item()})
        for cls in ("Saliency", "InputXGradient"):
            a = getattr(fastattr, cls)(model).attribute(x, target=t)
            b = getattr(ca, cls)(model).attribute(x, target=t)
            rows.append({"check": f"{name} {cls} vs captum", "rel_l2": ((a - b).norm() / b.norm()).item(), "max_abs_diff": (a - b).abs().max().item(), "scale": b.abs().max().item()})
        tri = fastattr.IntegratedGradients(model).attribute(x, target=t, kernel_backend="triton" if dev.type == "cuda" else "torch")
        ref = fastattr.IntegratedGradients(model).attribute(x, target=t, kernel_backend="torch")
        rows.append({"check": f"{name} IG triton vs torch kernels", "max_abs_diff": (tri - ref).abs().max().item(), "scale": ref.abs().max().item()})
        if not (tri - ref).abs().max().item() <= 1e-6 * ref.abs().max().item():
            raise RuntimeError(f"{name}: Triton and torch kernel paths disagree")
        for p in ("tf32", "bf16", "fp16"):
            a, d = fastattr.IntegratedGradients(model).attribute(x, target=t, precision=p, return_convergence_delta=True)
            rows.append({"check": f"{name} IG {p} vs fp32", "rel_l2": ((a - ref).norm() / ref.norm()).item(), "finite": bool(torch.isfinite(a).all() and torch.isfinite(d).all())})
    # a dataset run on the device (pinned prefetch, async copies, writer thread) equals the in-memory API
    import tempfile

    x = torch.randn(300, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        fastattr.run(cnn, x.numpy(), tmp + "/run", target="predicted", n_steps=16, shard_size=128, examples_per_batch=64, progress=False)
        store = fastattr.open(tmp + "/run")
        got = store[0:300]
        with torch.no_grad():
            pred = cnn(x.to(dev)).argmax(1)
        ref, delta = fastattr.IntegratedGradients(cnn).attribute(x.to(dev), target=pred, n_steps=16, return_convergence_delta=True)
        rows.append({"check": "cnn fastattr.run on cuda vs in-memory IG", "rel_l2": float(np.linalg.norm(got["attributions"]["x"] - ref.cpu().numpy()) / ref.norm().item()),
                     "delta_diff": float(np.abs(got["delta"] - delta.cpu().numpy()).max()), "indices_ok": bool((store.indices == np.arange(300)).all())})
        if not rows[-1]["indices_ok"] or not rows[-1]["rel_l2"] <= 1e-5:
            raise RuntimeError(f"dataset run on CUDA disagrees with the in-memory API: {rows[-1]}")
    # fp32 parity is judged normwise: cuDNN may pick other algorithms (and fastattr may run
    # channels-last), and a last-bit difference can flip a ReLU or max-pool argmax locally.
    failures = [r for r in rows if "rel_l2" in r and "vs captum" in r["check"] and not r["rel_l2"] <= 1e-4]
    for r in rows:
        print("  ", r)
    if failures:
        raise RuntimeError(f"GPU engine checks failed: {failures}")
    return rows


def layout_budget_sweep() -> list[dict]:
    """ResNet-18 IG on CUDA: channels-last on/off x memory budget x precision (sets defaults)."""
    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = models.randomize_batchnorm(models.ResNet18()).eval().to(dev)
    x = torch.randn(64, 3, 224, 224, device=dev)
    t = torch.randint(0, 1000, (64,), device=dev)
    rows = []
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            for budget in ("2GiB", "8GiB", "32GiB", None):
                fn = lambda p=precision, c=cl, b=budget: fastattr.IntegratedGradients(model).attribute(x, target=t, n_steps=50, precision=p, channels_last=c, memory_budget=b)  # noqa: E731
                seconds, peak, _ = bench_captum.timed(fn, dev, 3)
                rows.append({"precision": precision, "channels_last": cl, "budget": budget or "default", "seconds": seconds, "peak_mb": peak})
                print(f"   {rows[-1]}", flush=True)
    return rows


def _script(name: str, *argv: str) -> None:
    """Run another benchmark script of this folder in its own process; raise if it fails."""
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), name), *argv], check=True)


def _distributed(out: str) -> None:
    k = torch.cuda.device_count()
    if k < 2:
        print(f"   skipped: {k} GPU visible; scaling needs several (benchmarks/bench_distributed.py --ranks 1,K)", flush=True)
        return
    _script("bench_distributed.py", "--device", "cuda", "--ranks", f"1,{k}", "--out", os.path.join(out, "distributed.json"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: engine,sweep,kernels,captum,noise,layer,distributed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU suite needs one")
        return 2
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {__import__('triton').__version__} | {time.strftime('%Y-%m-%d')}", flush=True)
    summary, status = [], 0
    stages = [
        ("engine", lambda: engine_checks()),
        ("sweep", lambda: layout_budget_sweep()),
        ("kernels", lambda: bench_kernels.run(os.path.join(args.out, "kernels.json"))),
        ("captum", lambda: bench_captum.run("cuda", None, 3, os.path.join(args.out, "captum.json"))),
        # the gradient family, each its own script and process (JSON into --out)
        ("noise", lambda: _script("bench_noise.py", "--device", "cuda", "--json", os.path.join(args.out, "noise.json"))),
        ("layer", lambda: _script("bench_layer.py", "--device", "cuda", "--json", os.path.join(args.out, "layer.json"))),
        # throughput at 1 and K ranks under torchrun: only meaningful with K > 1 GPUs
        ("distributed", lambda: _distributed(args.out)),
    ]
    for name, fn in stages:
        if name in skip:
            continue
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        try:
            result = fn()
            if name in ("engine", "sweep"):
                with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                    json.dump(result, f, indent=1)
            if name == "captum":
                summary.append(bench_captum.table(result))
        except Exception:
            traceback.print_exc()
            status = 1
        print(f"== {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n".join(summary))
    return status


if __name__ == "__main__":
    sys.exit(main())
