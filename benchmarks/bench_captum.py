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
import ctypes
import gc
import json
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

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
}


@dataclass
class Row:
    case: str
    impl: str
    seconds: float | None
    peak_mb: float | None
    rel_err: float | None
    vs_captum_default: float | None = None
    vs_captum_best: float | None = None
    note: str = ""


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()  # hand freed heap back to the OS so the RSS delta sees this run's allocations
            self.base = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(median seconds, peak MB, result). The first run is the warm-up and the memory
    measurement (the RSS sampler thread would disturb timings); timed runs follow."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as mem:
        out = fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak / 2**20, out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a[: ref.shape[0]].double().cpu()
    return float((a - ref).norm() / ref.norm())


def reference(case: Case, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from captum.attr import IntegratedGradients as CaptumIG

    m64 = copy.deepcopy(model).double()
    xs, ts = x[: case.ref_samples].double(), target[: case.ref_samples]
    ibs = max(case.ref_samples, 4096 // case.ref_samples * case.ref_samples if x[0].numel() < 10000 else 16 * case.ref_samples)
    return CaptumIG(m64).attribute(xs, target=ts, n_steps=case.ref_steps, internal_batch_size=ibs).cpu()


def run_case(case: Case, device: torch.device, repeats: int, precisions: list[str]) -> list[Row]:
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
            seconds, peak, out = timed(fn, device, reps)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            return Row(case.name, label, None, None, None, note="out of memory")
        row = Row(case.name, label, seconds, peak, rel_err(out, ref))
        row.out = out  # type: ignore[attr-defined]
        return row

    default = attempt("captum (defaults)", captum(None), repeats)
    rows.append(default)
    # sweep Captum's internal_batch_size (it splits steps only: multiples of the batch)
    sweep = []
    for steps_per_chunk in (1, 2, 5, 10, 25):
        ibs = steps_per_chunk * case.samples
        r = attempt(f"captum ibs={ibs}", captum(ibs), 1)
        if r.seconds is not None:
            sweep.append((r.seconds, ibs))
    best_ibs = min(sweep)[1] if sweep else None
    best = attempt(f"captum best (ibs={best_ibs})", captum(best_ibs), repeats) if best_ibs else Row(case.name, "captum best", None, None, None, note="all OOM")
    rows.append(best)
    for precision in precisions:
        fn = lambda p=precision: fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=case.n_steps, precision=p)  # noqa: E731
        r = attempt(f"fastattr {precision}", fn, repeats)
        if precision == "fp32" and default.seconds is not None and r.seconds is not None:
            diff = (r.out - default.out).abs().max().item()  # type: ignore[attr-defined]
            r.note = f"max |fastattr - captum| = {diff:.1e}"
        rows.append(r)
    for r in rows:
        if r.seconds:
            r.vs_captum_default = default.seconds / r.seconds if default.seconds else None
            r.vs_captum_best = best.seconds / r.seconds if best.seconds else None
        r.__dict__.pop("out", None)
    gc.collect()
    return rows


def table(rows: list[Row]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "| case | implementation | time (s) | x vs Captum default | x vs Captum best | peak mem (MB) | rel. error vs fp64 | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.impl} | {f(r.seconds, '.3f')} | {f(r.vs_captum_default, '.2f')} | {f(r.vs_captum_best, '.2f')} | {f(r.peak_mb, '.0f')} | {f(r.rel_err, '.2e')} | {r.note} |"
        )
    return "\n".join(lines)


def run(device: str = "cpu", cases: list[str] | None = None, repeats: int = 3, json_path: str | None = None) -> list[Row]:
    dev = torch.device(device)
    # Captum runs under torch's global flags; make its "fp32" true fp32 (cuDNN defaults to
    # TF32 convolutions), so both sides compute the same thing. fastattr tf32 is its own row.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = cases or (["mlp", "cnn", "resnet"] if dev.type == "cuda" else ["mlp", "cnn"])
    precisions = ["fp32", "tf32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16", "fp16"]
    rows: list[Row] = []
    for name in cases:
        t0 = time.perf_counter()
        rows += run_case(CASES[name], dev, repeats, precisions)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
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
    env = f"torch {torch.__version__}, {torch.get_num_threads()} threads, " + (torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU")
    print(f"\n{env}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
