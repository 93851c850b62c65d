"""CPU rows per forward: fixed sizes vs batch_size="auto" (fastattr/budget.py), and compiled models.

    python benchmarks/bench_rows.py [--models demo,resnet50,vit] [--rows 16,32,64,128,256] [--repeats 2]
                                    [--compile demo] [--threads N] [--json PATH]

Workload per model: IntegratedGradients (gausslegendre) over one batch per call, fp32, CPU:
- demo: fastattr/demo.py's CNN (untrained; timing only), 1x24x24, 256 samples x 32 steps = 8192 rows
- resnet50: benchmarks/models.py's ResNet-50 (random init, eval) at 3x64x64 (224 is ~12x slower per
  row on 2 cores), 16 samples x 32 steps = 512 rows
- vit: benchmarks/models.py's ViT-S/16 (12 blocks, dim 384) at 3x64x64 (17 tokens), 16 x 32 = 512 rows

For each fixed ``internal_batch_size`` in ``--rows`` (exactly that many rows: the planner's tuning
below a cap is switched off for these calls, see ``_fixed``): rows/s (the best of ``--repeats`` calls: on a
shared host other jobs only ever slow a call down) after one call that measures peak host memory
(RSS high-water above the start, _harness.PeakMemory). For "auto" (no cap; the planner tunes): the
FIRST call (tuning from scratch, rows/s and peak RSS), then one call for memory and ``--repeats``
timed (best), and the rows the last call ran (the most common chunk size the model saw). "auto 1GiB" adds memory_budget="1GiB".
Run it against another checkout with PYTHONPATH=<checkout> to compare planners (the script uses
only APIs both have). Host load (1-minute load average) is printed before and after each model.

``--compile demo`` (or resnet50): eager vs compile=True (inductor; needs a C++ compiler): the
first call (compilation included) and steady rows/s; plus a user-compiled model
(torch.compile(model)) over 4 batches of different sizes: graphs compiled (dynamo's
unique_graphs) and total seconds.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
from models import ViT, resnet50  # noqa: E402

import fastattr  # noqa: E402
from fastattr import budget  # noqa: E402
from fastattr.demo import make_model  # noqa: E402

CASES: dict[str, tuple[Any, tuple[int, ...], int, int]] = {
    # name: (builder, one input's shape, samples per call, steps)
    "demo": (lambda: make_model().eval(), (1, 24, 24), 256, 32),
    "resnet50": (lambda: resnet50(), (3, 64, 64), 16, 32),
    "vit": (lambda: ViT(image=64, patch=16, classes=1000), (3, 64, 64), 16, 32),
}


def _reset_planner() -> None:
    """Forget sizes settled (and tuning progress) by earlier calls, as a fresh process would."""
    budget._settled.clear()
    getattr(budget, "_progress", {}).clear()


def _fixed(call: Any, **kw: Any) -> Any:
    """A call at exactly ``internal_batch_size`` rows: a cap above budget.CPU_TUNE_ABOVE (32; older
    checkouts: CPU_START_ROWS) is a cap the CPU planner tunes below, so tuning is switched off here."""
    names = [n for n in ("CPU_TUNE_ABOVE", "CPU_START_ROWS") if hasattr(budget, n)]
    saved = {n: getattr(budget, n) for n in names}
    try:
        for n in names:
            if n == "CPU_TUNE_ABOVE" or "CPU_TUNE_ABOVE" not in names:
                setattr(budget, n, 1 << 30)
        return call(**kw)
    finally:
        for n, v in saved.items():
            setattr(budget, n, v)


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def bench_model(name: str, rows_list: list[int], repeats: int) -> list[dict[str, Any]]:
    build, shape, samples, steps = CASES[name]
    torch.manual_seed(0)
    model = build()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(1))
    target = torch.arange(samples) % 4
    ig = fastattr.IntegratedGradients(model)
    work = samples * steps
    out = []
    print(f"[{name}: load {_load()}]", file=sys.stderr, flush=True)

    def call(**kw: Any) -> torch.Tensor:
        seen.clear()
        return ig.attribute(x, target=target, n_steps=steps, **kw)

    def measured(fn: Any) -> tuple[float, float]:
        """(best rows/s of ``repeats`` calls, peak MiB of one call before them)."""
        mem = h.measure_once(fn)
        return work / h.best_of(fn, "cpu", repeats).seconds, mem.peak_mb

    for rows in rows_list:
        rate, peak = measured(lambda r=rows: _fixed(call, internal_batch_size=r))
        out.append({"model": name, "rows": str(rows), "rows/s": rate, "peak MiB": peak, "settled rows": rows})
        print(f"  {name} rows={rows}: {rate:.0f} rows/s, {peak:.0f} MiB", file=sys.stderr, flush=True)
    for label, kw in (("auto", {}), ("auto 1GiB", {"memory_budget": "1GiB"})):
        _reset_planner()
        first = h.measure_once(lambda k=kw: call(**k))
        first_sizes = list(seen)
        rate, peak = measured(lambda k=kw: call(**k))
        settled = collections.Counter(seen).most_common(1)[0][0]
        out.append(
            {
                "model": name, "rows": label, "rows/s": rate, "peak MiB": peak, "settled rows": settled,
                "first call rows/s": work / first.seconds, "first call peak MiB": first.peak_mb,
                "first call sizes": " ".join(map(str, sorted(set(first_sizes)))),
            }
        )  # fmt: skip
        print(f"  {name} {label}: {rate:.0f} rows/s, {peak:.0f} MiB, settled {settled}; first call {work / first.seconds:.0f} rows/s "
              f"{first.peak_mb:.0f} MiB sizes {sorted(set(first_sizes))}", file=sys.stderr, flush=True)  # fmt: skip
    print(f"[{name}: load {_load()}]", file=sys.stderr, flush=True)
    return out


def bench_compile(name: str, repeats: int) -> list[dict[str, Any]]:
    import torch._dynamo

    build, shape, samples, steps = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(1))
    target = torch.arange(samples) % 4
    work = samples * steps
    ig = fastattr.IntegratedGradients(model)
    eager = ig.attribute(x, target=target, n_steps=steps, channels_last=False)
    out = []
    runs = [("eager (default layout)", {}), ("eager NCHW", {"channels_last": False})]
    if "compile" in fastattr.Options.__dataclass_fields__:  # older checkouts have no compile option
        runs.append(("compile=True", {"compile": True}))
    for label, kw in runs:
        _reset_planner()
        torch._dynamo.reset()
        first = h.measure_once(lambda k=kw: ig.attribute(x, target=target, n_steps=steps, **k))
        t = h.timed(lambda k=kw: ig.attribute(x, target=target, n_steps=steps, **k), "cpu", repeats)
        err = h.rel_err(t.result, eager)
        out.append({"model": name, "run": label, "first call s": first.seconds, "rows/s": work / t.seconds, "peak MiB": t.peak_mb, "rel err vs eager NCHW": err})
        print(f"  {name} {label}: first {first.seconds:.1f} s, {work / t.seconds:.0f} rows/s, err {err:.1e}", file=sys.stderr, flush=True)
    # a model the user compiled, over batches of several sizes: graphs compiled and total time
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model)
    cig = fastattr.IntegratedGradients(compiled)
    t0 = time.perf_counter()
    for b in (samples, samples // 2 + 1, samples, 3):
        cig.attribute(x[:b], target=target[:b], n_steps=steps, return_convergence_delta=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out.append({"model": name, "run": "torch.compile(model), 4 batches", "first call s": time.perf_counter() - t0, "graphs compiled": graphs})
    print(f"  {name} user-compiled: {graphs} graphs, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,resnet50,vit")
    ap.add_argument("--rows", default="16,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", default="", help="models for the compile comparison (e.g. demo)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=os.path.join(h.RESULTS, "rows_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",") if r]
    info = h.env()
    print(h.env_line(info))
    print(f"fastattr from {os.path.dirname(fastattr.__file__)}; load {_load()}")
    rows = [r for m in args.models.split(",") if m for r in bench_model(m, rows_list, args.repeats)]
    if rows:
        print(h.dict_table(rows))
    comp = [r for m in args.compile.split(",") if m for r in bench_compile(m, args.repeats)]
    if comp:
        print()
        print(h.dict_table(comp))
    print(f"load {_load()}")
    print("wrote", h.write_json(args.json, {"env": info, "rows": rows, "compile": comp}))


if __name__ == "__main__":
    main()
