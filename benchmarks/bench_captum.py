"""fastattr vs Captum, side by side in one process, on the same model and data.

For each case it reports wall time (median of repeats), the ratio to Captum with its
defaults and to Captum with the best internal_batch_size of a sweep, peak memory, and
the relative L2 error of each result against a float64 reference (Captum in float64,
Gauss-Legendre with many steps, on the first few samples). Accuracy and speed are
reported together: a faster, less accurate point says so in its error column.

    python benchmarks/bench_captum.py                    # CPU cases: mlp, cnn
    python benchmarks/bench_captum.py --device cuda      # adds the ResNet-18 224x224 case
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
import models  # noqa: E402
from _harness import Row  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]
    samples: int
    n_steps: int = 50
    classes: int = 10
    ref_samples: int = 16
    ref_steps: int = 2048


CASES = {
    "mlp": Case("mlp 64-256-256-10", models.mlp, (64,), 1024),
    "cnn": Case("cnn 3x32x32", models.small_cnn, (3, 32, 32), 256, ref_steps=1024),
    "resnet": Case("resnet18 3x224x224", lambda: models.randomize_batchnorm(models.ResNet18()), (3, 224, 224), 64, classes=1000, ref_samples=4, ref_steps=256),
    # not in the default set: the GPU suite's cases (issue 16: the bf16 contrast between the two)
    "resnet50": Case("resnet50 3x224x224", models.resnet50, (3, 224, 224), 32, classes=1000, ref_samples=4, ref_steps=256),
    "vit": Case("vit-s/16 3x224x224", models.ViT, (3, 224, 224), 32, classes=1000, ref_samples=4, ref_steps=256),
}
SWEEP = (1, 2, 5, 10, 25)  # Captum's internal_batch_size sweep, in steps x samples


def reference(case: Case, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from captum.attr import IntegratedGradients as CaptumIG

    m64 = copy.deepcopy(model).double()
    xs, ts = x[: case.ref_samples].double(), target[: case.ref_samples]
    ibs = max(case.ref_samples, 4096 // case.ref_samples * case.ref_samples if x[0].numel() < 10000 else 16 * case.ref_samples)
    return CaptumIG(m64).attribute(xs, target=ts, n_steps=case.ref_steps, internal_batch_size=ibs).cpu()


def run_case(case: Case, device: torch.device, repeats: int, precisions: list[str], sweep: Sequence[int] = SWEEP) -> list[Row]:
    from captum.attr import IntegratedGradients as CaptumIG

    torch.manual_seed(0)
    model = case.build().eval().to(device)
    x = torch.randn(case.samples, *case.input_shape, device=device)
    target = torch.randint(0, case.classes, (case.samples,), device=device)
    ref = reference(case, model, x, target)
    rows: list[Row] = []

    def captum(ibs: int | None) -> Callable[[], torch.Tensor]:
        return lambda: CaptumIG(model).attribute(x, target=target, n_steps=case.n_steps, internal_batch_size=ibs)

    def attempt(label: str, fn: Callable[[], torch.Tensor], reps: int) -> Row:
        try:
            seconds, peak, out = h.timed(fn, device, reps)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            return Row(case.name, label, None, None, None, note="out of memory")
        row = Row(case.name, label, seconds, peak, h.rel_err(out, ref))
        row.out = out  # type: ignore[attr-defined]
        return row

    default = attempt("captum (defaults)", captum(None), repeats)
    rows.append(default)
    # sweep Captum's internal_batch_size (it splits steps only: multiples of the batch)
    timings = []
    for steps_per_chunk in sweep:
        ibs = steps_per_chunk * case.samples
        r = attempt(f"captum ibs={ibs}", captum(ibs), 1)
        if r.seconds is not None:
            timings.append((r.seconds, ibs))
    best_ibs = min(timings)[1] if timings else None
    best = attempt(f"captum best (ibs={best_ibs})", captum(best_ibs), repeats) if best_ibs else Row(case.name, "captum best", None, None, None, note="all OOM")
    rows.append(best)
    for precision in precisions:
        fn = lambda p=precision: fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=case.n_steps, precision=p)  # noqa: E731
        r = attempt(f"fastattr {precision}", fn, repeats)
        if precision == "fp32" and default.seconds is not None and r.seconds is not None:
            diff = (r.out - default.out).abs().max().item()  # type: ignore[attr-defined]
            r.note = f"max |fastattr - captum| = {diff:.1e}"
        rows.append(r)
    h.speedups(rows, default, best)
    for r in rows:
        r.__dict__.pop("out", None)
    gc.collect()
    return rows


def run(device: str = "cpu", cases: list[str] | None = None, repeats: int = 3, json_path: str | None = None) -> list[Row]:
    dev = torch.device(device)
    h.true_fp32()  # Captum runs under torch's global flags: its fp32 must be fp32 (fastattr tf32 is its own row)
    cases = cases or (["mlp", "cnn", "resnet"] if dev.type == "cuda" else ["mlp", "cnn"])
    precisions = ["fp32", "tf32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16", "fp16"]
    rows: list[Row] = []
    for name in cases:
        t0 = time.perf_counter()
        rows += run_case(CASES[name], dev, repeats, precisions)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    if json_path:
        h.write_json(json_path, {"rows": rows}, dev)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default=None, help="comma-separated: " + ",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    rows = run(args.device, args.cases.split(",") if args.cases else None, args.repeats, args.json)
    print(f"\n{h.env_line(h.env(args.device))}\n\n{h.table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
