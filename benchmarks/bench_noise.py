"""NoiseTunnel (SmoothGrad over IG) and GradientShap: fastattr vs Captum, side by side in one
process, on the same model and data.

Per case: wall time (median of repeats, after a warm-up run that also measures peak
memory), the ratio to Captum with its defaults and to Captum's best-tuned call (a sweep of
nt_samples_batch_size x internal_batch_size for NoiseTunnel; GradientShap has no batching
knob), peak memory (CPU: sampled RSS above the start, after malloc_trim; CUDA: allocator
peak), and the relative L2 error against a float64 reference computed on the SAME draws.

Error protocol: each implementation's error is measured on the first ``--ref-samples``
examples, with torch/numpy seeded identically before every call and one noise partition,
so Captum, fastattr (its Captum-order path, seed=None) and the float64 reference (Captum
in float64 with ``--ref-steps`` IG steps) all see the same noise, baselines and alphas
(noise is drawn in float32 in every case). Timed runs use the full batch; the noise
realisation there differs between batching settings, the accuracy does not.

    python benchmarks/bench_noise.py --json benchmarks/results/noise-cpu.json
    python benchmarks/bench_noise.py --samples 16 --nt-samples 4 --steps 8 --repeats 1   # quick check
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import warnings
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
import models  # noqa: E402
from _harness import Row, rel_err  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore")


def seeded(fn: Callable[[], torch.Tensor], seed: int = 0) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        torch.manual_seed(seed)
        np.random.seed(seed)
        return fn()

    return call


def attempt(case: str, label: str, fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> Row:
    try:
        seconds, peak, _ = h.timed(fn, device, reps)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return Row(case, label, None, None, None, note="out of memory")
    return Row(case, label, seconds, peak, None)


def smoothgrad_ig(args: argparse.Namespace, device: torch.device) -> list[Row]:
    from captum.attr import IntegratedGradients as CIG
    from captum.attr import NoiseTunnel as CNT

    case = f"cnn 3x32x32, {args.samples} samples, SmoothGrad(IG) nt={args.nt_samples} steps={args.steps}"
    torch.manual_seed(0)
    model = models.small_cnn().eval().to(device)
    x = torch.randn(args.samples, 3, 32, 32, device=device)
    t = torch.randint(0, 10, (args.samples,), device=device)
    common = dict(nt_type="smoothgrad", nt_samples=args.nt_samples, stdevs=args.stdev, target=t, n_steps=args.steps)

    def captum(nsbs: int | None, ibs: int | None, m: torch.nn.Module = model, xx: torch.Tensor = x, **kw) -> Callable[[], torch.Tensor]:
        kw = {**common, "target": t[: xx.shape[0]], **kw}
        return lambda: CNT(CIG(m)).attribute(xx, nt_samples_batch_size=nsbs, internal_batch_size=ibs, **kw)

    def ours(precision: str, xx: torch.Tensor = x) -> Callable[[], torch.Tensor]:
        return lambda: fastattr.NoiseTunnel(fastattr.IntegratedGradients(model)).attribute(xx, precision=precision, **{**common, "target": t[: xx.shape[0]]})

    rows = [attempt(case, "captum (defaults)", seeded(captum(None, None)), device, args.repeats)]
    sweep = []
    for nsbs in sorted({1, max(1, args.nt_samples // 2), args.nt_samples}):
        for steps_per_chunk in (1, 5, args.steps):
            ibs = steps_per_chunk * args.samples * nsbs
            r = attempt(case, f"captum nsbs={nsbs} ibs={ibs}", seeded(captum(nsbs, ibs)), device, 1)
            if r.seconds is not None:
                sweep.append((r.seconds, nsbs, ibs))
    best = None
    if sweep:
        _, nsbs, ibs = min(sweep)
        best = attempt(case, f"captum best (nsbs={nsbs}, ibs={ibs})", seeded(captum(nsbs, ibs)), device, args.repeats)
        rows.append(best)
    for p in args.precisions:
        rows.append(attempt(case, f"fastattr {p}", seeded(ours(p)), device, args.repeats))
    # accuracy on the same draws (see module docstring)
    xr = x[: args.ref_samples]
    m64 = copy.deepcopy(model).double()
    ref = seeded(captum(None, None, m=m64, xx=xr.double(), n_steps=args.ref_steps))().cpu()
    errs = {"captum": rel_err(seeded(captum(None, None, xx=xr))(), ref)}
    for p in args.precisions:
        errs[p] = rel_err(seeded(ours(p, xr))(), ref)
    for r in rows:
        r.rel_err = errs.get(r.impl.split()[1], errs["captum"]) if r.impl.startswith("fastattr") else errs["captum"]
    return finish(rows, rows[0], best)


def gradient_shap(args: argparse.Namespace, device: torch.device) -> list[Row]:
    from captum.attr import GradientShap as CGS

    case = f"cnn 3x32x32, {args.samples} samples, GradientShap n={args.n_samples}"
    torch.manual_seed(1)
    model = models.small_cnn().eval().to(device)
    x = torch.randn(args.samples, 3, 32, 32, device=device)
    refs = torch.randn(args.references, 3, 32, 32, device=device)
    t = torch.randint(0, 10, (args.samples,), device=device)

    def captum(m: torch.nn.Module = model, xx: torch.Tensor = x, rr: torch.Tensor = refs) -> Callable[[], torch.Tensor]:
        return lambda: CGS(m).attribute(xx, rr, n_samples=args.n_samples, stdevs=args.stdev, target=t[: xx.shape[0]])

    def ours(precision: str, xx: torch.Tensor = x) -> Callable[[], torch.Tensor]:
        return lambda: fastattr.GradientShap(model).attribute(xx, refs, n_samples=args.n_samples, stdevs=args.stdev, target=t[: xx.shape[0]], precision=precision)

    rows = [attempt(case, "captum (defaults)", seeded(captum()), device, args.repeats)]
    for p in args.precisions:
        rows.append(attempt(case, f"fastattr {p}", seeded(ours(p)), device, args.repeats))
    xr = x[: args.ref_samples]
    ref = seeded(captum(copy.deepcopy(model).double(), xr.double(), refs.double()))().cpu()
    errs = {"captum": rel_err(seeded(captum(xx=xr))(), ref)}
    for p in args.precisions:
        errs[p] = rel_err(seeded(ours(p, xr))(), ref)
    for r in rows:
        r.rel_err = errs[r.impl.split()[1]] if r.impl.startswith("fastattr") else errs["captum"]
    return finish(rows, rows[0], None)


def finish(rows: list[Row], default: Row, best: Row | None) -> list[Row]:
    h.speedups(rows, default, best)  # GradientShap: Captum has no knob, its default is its best
    gc.collect()
    return rows


CASES = {"smoothgrad_ig": smoothgrad_ig, "gradient_shap": gradient_shap}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="smoothgrad_ig,gradient_shap")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--nt-samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="IG steps inside SmoothGrad")
    parser.add_argument("--n-samples", type=int, default=50, help="GradientShap samples")
    parser.add_argument("--references", type=int, default=100, help="GradientShap reference rows")
    parser.add_argument("--stdev", type=float, default=0.15)
    parser.add_argument("--ref-samples", type=int, default=4)
    parser.add_argument("--ref-steps", type=int, default=256)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    return parser


def run(args: argparse.Namespace) -> list[Row]:
    """Every case of ``args.cases`` (parsed by ``build_parser()``; precisions a list)."""
    device = torch.device(args.device)
    h.true_fp32()
    rows: list[Row] = []
    for name in args.cases.split(","):
        with h.stage_timer(name):
            rows += CASES[name](args, device)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.precisions = args.precisions.split(",")
    rows = run(args)
    device = torch.device(args.device)
    print(f"\n{h.env_line(h.env(device))}; peak mem: {'CUDA allocator' if device.type == 'cuda' else 'sampled RSS'} above start\n\n{h.table(rows)}")
    if args.json:
        h.write_json(args.json, {"args": vars(args), "rows": rows}, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
