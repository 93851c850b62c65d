"""End-to-end dataset runs: fastattr.run vs a plain loop that calls Captum per batch and
saves with numpy, on the same model and memory-mapped data, in one process.

Reports wall time, throughput, peak host memory (RSS above the start, at two dataset
sizes: it must stay flat as the dataset grows), the store's rate (attribution bytes the
store absorbs per second, uncompressed, and the bytes on disk) and the share of fastattr's
time spent outside the model's forward/backward, estimated against a bare loop that only
runs forward + one autograd.grad over the same rows in the same chunk size.

    python benchmarks/bench_dataset.py                       # CPU: 10,000 and 20,000 samples, IG-16, 3x32x32 CNN
    python benchmarks/bench_dataset.py --device cuda --sizes 20000,40000
    python benchmarks/bench_dataset.py --device cuda --model resnet50 --methods saliency,ig --sizes 2048
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
import models  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore")
EXAMPLES = 256  # samples per Captum call (fastattr.run picks its own examples_per_batch)
MODELS = {"small_cnn": (models.small_cnn, 32), "resnet50": (models.resnet50, 224)}  # builder, default input size
# per method: fastattr.run's name, gradient rows per sample per step, forward-only rows per sample
# any such run needs with a predicted target (IG: F(x), F(x0) for the delta, the argmax taken from
# F(x)'s forward; saliency: none, the argmax comes from the gradient pass's own forward)
METHODS = {"ig": ("integrated_gradients", 1, 2), "saliency": ("saliency", 1, 0)}


def captum_loop(model: torch.nn.Module, data: np.ndarray, out_dir: str, method: str, n_steps: int, device: torch.device, ibs: int) -> None:
    """What users run today: per batch, predict, Captum IG with delta (or Saliency), np.save the results."""
    from captum.attr import IntegratedGradients as CaptumIG
    from captum.attr import Saliency as CaptumSaliency

    ig, sal = CaptumIG(model), CaptumSaliency(model)
    for start in range(0, len(data), EXAMPLES):
        x = torch.from_numpy(np.array(data[start : start + EXAMPLES])).to(device)
        with torch.no_grad():
            target = model(x).argmax(1)
        if method == "saliency":
            attr = sal.attribute(x, target=target, abs=True)
        else:
            attr, delta = ig.attribute(x, target=target, n_steps=n_steps, internal_batch_size=ibs, return_convergence_delta=True)
            np.save(os.path.join(out_dir, f"delta-{start:08d}.npy"), delta.detach().cpu().numpy())
        np.save(os.path.join(out_dir, f"attr-{start:08d}.npy"), attr.detach().cpu().numpy())


def model_only(model: torch.nn.Module, data: np.ndarray, n_steps: int, device: torch.device, rows: int, precision: str, forward_rows: int = 2) -> None:
    """The floor: forward + one autograd.grad over every (step, sample) row, in the chunk size
    and memory layout fastattr used, plus the forward-only rows per sample that any run with a
    predicted target needs (IG with a convergence delta: F(x), F(x0))."""
    policy = fastattr.precision.get_precision(precision)
    total = len(data) * n_steps
    x = torch.randn(rows, *data.shape[1:], device=device)
    if fastattr.engine.use_channels_last(None, device, policy, model):
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
            for start in range(0, forward_rows * len(data), EXAMPLES):
                model(xf[: min(EXAMPLES, forward_rows * len(data) - start)])
        h.sync(device)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def measure(fn, device: torch.device) -> tuple[float, float]:
    seconds, peak_mb, _ = h.measure_once(fn, device, memory_on="cpu")  # host memory, whatever the device
    return seconds, peak_mb


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Every (size, method, precision) of ``args`` (see ``build_parser``); returns (env line, rows)."""
    device = torch.device(args.device)
    h.true_fp32()
    torch.manual_seed(0)
    build, default_size = MODELS[args.model]
    size = args.input_size or default_size
    model = build().eval().to(device)
    methods = args.methods.split(",")
    tmp = tempfile.mkdtemp(prefix="fastattr-bench-")
    rows_out: list[dict] = []
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        path = os.path.join(tmp, "data.npy")
        np.save(path, np.random.default_rng(0).standard_normal((max(sizes), 3, size, size)).astype(np.float32))
        full = np.load(path, mmap_mode="r")
        sample_bytes = 4 * math.prod(full.shape[1:])  # float32 attributions, as stored
        # warm-up (allocator, kernels) outside the measurements
        for m in methods:
            fastattr.run(model, full[: args.warmup], os.path.join(tmp, f"warm-{m}"), METHODS[m][0], n_steps=args.steps, progress=False)
        for n in sizes:
            data = full[:n]
            for m in methods:
                name, _, forward_rows = METHODS[m]
                steps = args.steps if m == "ig" else 1
                label = f"IG-{args.steps}" if m == "ig" else "saliency"
                for precision in args.precisions.split(","):
                    out = os.path.join(tmp, f"fa-{n}-{m}-{precision}")
                    # --repeats: run and floor alternate, each rated by its fastest repeat (a shared host only ever slows one down)
                    seconds = floor = peak = math.inf
                    for _ in range(args.repeats):
                        shutil.rmtree(out, ignore_errors=True)
                        chunks: list[int] = []
                        # gradient chunks only (grad mode on): their settled size is the floor's chunk size
                        hook = model.register_forward_pre_hook(lambda _m, a, chunks=chunks: chunks.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
                        s, p = measure(lambda data=data, out=out, precision=precision, name=name: fastattr.run(model, data, out, name, n_steps=args.steps, precision=precision, progress=False), device)
                        hook.remove()
                        store = fastattr.open(out)
                        assert len(store) == n
                        rows = max(set(chunks), key=chunks.count)  # the gradient passes' settled chunk size
                        f, _ = measure(lambda data=data, precision=precision, rows=rows, steps=steps, fr=forward_rows: model_only(model, data, steps, device, rows=rows, precision=precision, forward_rows=fr), device)
                        seconds, floor, peak = min(seconds, s), min(floor, f), min(peak, p)
                    rows_out.append({"impl": f"fastattr.run {label} {precision}", "method": label, "samples": n, "seconds": seconds, "samples_per_s": n / seconds, "peak_host_mb": peak,
                                     "outside_model": 1 - floor / seconds, "model_only_s": floor, "rows_per_forward": rows,
                                     "store_mb_per_s": n * sample_bytes / seconds / 1e6, "disk_mb": disk_bytes(out) / 1e6})  # fmt: skip
                    print(rows_out[-1], flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                out = os.path.join(tmp, f"captum-{n}-{m}")
                os.makedirs(out)
                ibs = args.captum_ibs or (EXAMPLES if device.type == "cpu" or args.model != "small_cnn" else EXAMPLES * args.steps)
                seconds, peak = measure(lambda data=data, out=out, ibs=ibs, m=m: captum_loop(model, data, out, m, args.steps, device, ibs), device)
                rows_out.append({"impl": f"captum loop {label} + np.save" + (f" (ibs={ibs})" if m == "ig" else ""), "method": label, "samples": n, "seconds": seconds, "samples_per_s": n / seconds,
                                 "peak_host_mb": peak, "outside_model": None, "model_only_s": None, "store_mb_per_s": n * sample_bytes / seconds / 1e6, "disk_mb": disk_bytes(out) / 1e6})  # fmt: skip
                print(rows_out[-1], flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    env = f"{h.env_line(h.env(device))}, {args.model} 3x{size}x{size}, IG {args.steps} steps"
    return env, rows_out


def table(rows_out: list[dict]) -> str:
    cells = []
    for r in rows_out:
        base = next(b for b in rows_out if b["samples"] == r["samples"] and b["method"] == r["method"] and b["impl"].startswith("captum"))
        share = "-" if r["outside_model"] is None else f"{100 * r['outside_model']:.1f}%"
        cells.append([r["impl"], r["samples"], f"{r['seconds']:.1f}", f"{r['samples_per_s']:,.0f}", f"{base['seconds'] / r['seconds']:.2f}", f"{r['peak_host_mb']:.0f}", share, f"{r['store_mb_per_s']:,.0f}", f"{r['disk_mb']:,.0f}"])
    headers = ["implementation", "samples", "time (s)", "samples/s", "x vs Captum loop", "peak host mem (MB)", "time outside fwd/bwd", "store MB/s (raw)", "on disk (MB)"]
    return h.markdown(headers, cells, [False] + [True] * 8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small_cnn", choices=sorted(MODELS))
    parser.add_argument("--input-size", type=int, default=None, help="image side (default: 32 for small_cnn, 224 for resnet50)")
    parser.add_argument("--methods", default="ig", help="comma-separated: ig,saliency")
    parser.add_argument("--sizes", default="10000,20000")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=512, help="samples of the untimed warm-up run")
    parser.add_argument("--captum-ibs", type=int, default=None, help="Captum's internal_batch_size (default: 256, or 256 x steps for the CNN on CUDA)")
    parser.add_argument("--repeats", type=int, default=1, help="fastattr runs and floors per case, alternating; each rated by its fastest")
    parser.add_argument("--json", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env, rows_out = run(args)
    print(f"\n{env}\n\n" + table(rows_out))
    if args.json:
        h.write_json(args.json, {"env_line": env, "args": vars(args), "rows": rows_out}, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
