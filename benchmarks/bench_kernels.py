"""Benchmark fastattr's Triton kernels against the torch references they replace (CUDA only).

For each kernel: check correctness on fresh random inputs against the float64 reference
(fails loudly on mismatch), then time Triton and the torch reference with
triton.testing.do_bench (median), and report GB/s (each input read once, each output
written once), % of device-to-device copy bandwidth, and the speedup over torch.

    python benchmarks/bench_kernels.py [--json results.json]
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --quick   # CPU smoke: tiny sizes, interpreter

On a machine without CUDA it prints a skip message and exits 0 (unless --quick under
TRITON_INTERPRET=1: then the correctness checks run in the interpreter on tiny sizes, and the
times, taken with a plain clock, say nothing about the kernels). From another script:
``bench_kernels.run(json_path, quick=False)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
from _harness import max_rel as _max_rel  # noqa: E402

WARMUP, REP = 25, 100
F_IMG = 3 * 224 * 224  # 150528
DEVICE = "cuda"  # "cpu" only in --quick mode under the interpreter


def _do_bench(fn: Callable[[], object]) -> float:
    """Median milliseconds: triton's do_bench on CUDA, one timed call after a warm-up on CPU."""
    if DEVICE == "cpu":
        return 1e3 * h.timed(fn, "cpu", 1, memory=False)[0]
    import triton.testing

    return triton.testing.do_bench(fn, warmup=WARMUP, rep=REP, return_mode="median")


def _copy_bandwidth(quick: bool = False) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written) on ~2 GB (quick: 64 MB)."""
    src = torch.empty(2**24 if quick else 2**29, dtype=torch.float32, device=DEVICE).normal_()  # 2 GiB
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _check(label: str, errors: dict[str, float], tol: dict[str, float]) -> float:
    """Raise if any error exceeds its tolerance (default 1e-5); return the largest error."""
    print(f"  {label}: max rel error " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v <= tol.get(k, 1e-5)}  # `not <=` also catches NaN
    if bad:
        raise RuntimeError(f"{label}: Triton result does not match the float64 reference: {bad} (tolerances {tol})")
    return max(errors.values())


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _cases(quick: bool = False) -> list[tuple[str, str, Callable[[], dict]]]:
    from fastattr.kernels import reference
    from fastattr.kernels.triton_channel_reduce import channel_reduce_triton
    from fastattr.kernels.triton_finalize import finalize_triton
    from fastattr.kernels.triton_step_sums import moments_triton, path_accumulate_triton

    def path_accumulate(dtype: torch.dtype, per_row: bool, S: int = 64, B: int = 64, F: int = F_IMG) -> dict:
        acc, grads = _randn(B, F), _randn(S, B, F, dtype=dtype)
        w = torch.rand(*((S, B) if per_row else (S,)), device=DEVICE)
        ref = reference.path_accumulate(acc.double(), grads.double(), w.double())
        err = {"acc": _max_rel(path_accumulate_triton(acc.clone(), grads, w), ref)}
        del ref
        return dict(
            err=err, tol={}, bytes=_nbytes(grads, w) + 2 * _nbytes(acc),
            triton=lambda: path_accumulate_triton(acc, grads, w), torch=lambda: reference.path_accumulate(acc, grads, w),
        )

    def finalize(in_dtype: torch.dtype, out_dtype: torch.dtype, B: int = 512, F: int = F_IMG) -> dict:
        acc, x, base = _randn(B, F), _randn(B, F, dtype=in_dtype), _randn(B, F, dtype=in_dtype)
        ref_attr, ref_stats = reference.finalize(acc.double(), x.double(), base.double())
        attr, stats = finalize_triton(acc, x, base, out_dtype=out_dtype)
        err = {
            "attr": _max_rel(attr, ref_attr.to(out_dtype)),  # vs the reference rounded to out_dtype
            "sum": _max_rel(stats.sum, ref_stats.sum, scale=ref_stats.l1.double()),  # a row sum may cancel
            "l1": _max_rel(stats.l1, ref_stats.l1),
            "l2": _max_rel(stats.l2, ref_stats.l2),
            "absmax": _max_rel(stats.absmax, ref_stats.absmax),
            "nonfinite": float((stats.nonfinite != ref_stats.nonfinite).sum().item()),
        }
        # attr may differ from the reference's single rounding by one out_dtype ulp (fp32 product first)
        tol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[out_dtype]
        del ref_attr, attr
        return dict(
            err=err, tol={"attr": tol}, bytes=_nbytes(acc, x, base) + B * F * torch.finfo(out_dtype).bits // 8 + 5 * B * 4,
            triton=lambda: finalize_triton(acc, x, base, out_dtype=out_dtype),
            torch=lambda: reference.finalize(acc, x, base, out_dtype),
        )

    def moments(dtype: torch.dtype, per_row: bool, S: int = 64, B: int = 64, F: int = F_IMG) -> dict:
        s1, s2, grads = _randn(B, F), _randn(B, F).abs(), _randn(S, B, F, dtype=dtype)
        w = torch.rand(S, B, device=DEVICE) if per_row else None
        r1, r2 = reference.moments(s1.double(), s2.double(), grads.double(), None if w is None else w.double())
        o1, o2 = moments_triton(s1.clone(), s2.clone(), grads, w)
        err = {"sum_g": _max_rel(o1, r1), "sum_sq": _max_rel(o2, r2)}
        del r1, r2, o1, o2
        return dict(
            err=err, tol={}, bytes=_nbytes(grads, w) + 2 * _nbytes(s1, s2),
            triton=lambda: moments_triton(s1, s2, grads, w), torch=lambda: reference.moments(s1, s2, grads, w),
        )

    def channel_reduce(dtype: torch.dtype, mode: str, shape=(512, 3, 224, 224), dim: int = 1) -> dict:
        x = _randn(*shape, dtype=dtype)
        ref = reference.channel_reduce(x.double(), dim, mode)
        out = channel_reduce_triton(x, dim, mode)
        scale = reference.channel_reduce(x.double(), dim, "abs") if mode == "sum" else ref.abs() + 1e-30
        err = {"out": _max_rel(out, ref, scale=scale)}
        del ref, scale
        return dict(
            err=err, tol={}, bytes=_nbytes(x, out),
            triton=lambda: channel_reduce_triton(x, dim, mode), torch=lambda: reference.channel_reduce(x, dim, mode),
        )

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if quick:  # tiny sizes, every kernel and flag once; F spans two 1024-wide blocks
        return [
            ("path_accumulate", "S=4 B=3 F=1531 bf16 grads, w (S,B)", lambda: path_accumulate(bf16, True, S=4, B=3, F=1531)),
            ("finalize", "B=3 F=1531 bf16 in -> fp16", lambda: finalize(bf16, f16, B=3, F=1531)),
            ("moments", "S=4 B=3 F=1531 fp32 grads, no w", lambda: moments(f32, False, S=4, B=3, F=1531)),
            ("channel_reduce", "(4,3,16,16) dim 1 bf16 sum", lambda: channel_reduce(bf16, "sum", shape=(4, 3, 16, 16))),
        ]
    return [
        ("path_accumulate", "S=64 B=64 F=150528 fp32 grads, w (S,)", lambda: path_accumulate(f32, False)),
        ("path_accumulate", "S=64 B=64 F=150528 bf16 grads, w (S,)", lambda: path_accumulate(bf16, False)),
        ("path_accumulate", "S=64 B=64 F=150528 fp32 grads, w (S,B)", lambda: path_accumulate(f32, True)),
        ("finalize", "B=512 F=150528 fp32 in -> fp32", lambda: finalize(f32, f32)),
        ("finalize", "B=512 F=150528 bf16 in -> fp16", lambda: finalize(bf16, f16)),
        ("moments", "S=64 B=64 F=150528 fp32 grads, no w", lambda: moments(f32, False)),
        ("moments", "S=64 B=64 F=150528 bf16 grads, w (S,B)", lambda: moments(bf16, True)),
        ("channel_reduce", "(512,3,224,224) dim 1 fp32 l2", lambda: channel_reduce(f32, "l2")),
        ("channel_reduce", "(512,3,224,224) dim 1 bf16 sum", lambda: channel_reduce(bf16, "sum")),
    ]


def table(rows: list[dict], copy_gbps: float, device: str) -> str:
    lines = [
        f"device: {device}; copy bandwidth {copy_gbps:.0f} GB/s",
        "",
        "| kernel | case | triton ms | torch ms | GB/s | % copy BW | speedup | max rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | {r['triton_gbps']:.0f} "
            f"| {r['pct_copy_bw']:.0f}% | {r['speedup']:.2f}x | {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def run(json_path: str | None = None, quick: bool = False) -> list[dict]:
    """Run every benchmark case; print a markdown table, optionally write JSON; return the rows.

    quick: tiny sizes; without CUDA it needs TRITON_INTERPRET=1 (set before triton is imported)."""
    global DEVICE
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not (quick and interpret):
        print("bench_kernels: skipped, no CUDA device (these are GPU kernel benchmarks; --quick with TRITON_INTERPRET=1 checks them on CPU)")
        return []
    if torch.cuda.is_available() and interpret:
        print("bench_kernels: skipped, TRITON_INTERPRET=1 runs the kernels in the interpreter; unset it")
        return []
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels: skipped, triton is not installed")
        return []

    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    device = h.card(DEVICE) + (" (Triton interpreter: times mean nothing)" if DEVICE == "cpu" else "")
    copy_gbps = _copy_bandwidth(quick)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(f"{device}: device copy bandwidth {copy_gbps:.0f} GB/s")
    rows = []
    for kernel, case, setup in _cases(quick):
        print(f"{kernel}: {case}")
        c = setup()
        err = _check(f"{kernel} [{case}]", c["err"], c["tol"])
        t_ms, r_ms = _do_bench(c["triton"]), _do_bench(c["torch"])
        gbps = c["bytes"] / (t_ms * 1e-3) / 1e9
        rows.append(
            dict(
                kernel=kernel, case=case, triton_ms=t_ms, torch_ms=r_ms, bytes=c["bytes"], triton_gbps=gbps,
                torch_gbps=c["bytes"] / (r_ms * 1e-3) / 1e9, pct_copy_bw=100 * gbps / copy_gbps,
                speedup=r_ms / t_ms, max_rel_err=err,
            )
        )
        print(f"  triton {t_ms:.3f} ms ({gbps:.0f} GB/s, {rows[-1]['pct_copy_bw']:.0f}% of copy), torch {r_ms:.3f} ms")
        del c
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print()
    print(table(rows, copy_gbps, device))
    if json_path:
        h.write_json(json_path, {"device": device, "copy_gbps": copy_gbps, "rows": rows}, DEVICE)
        print(f"wrote {json_path}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test; on CPU with TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    run(args.json, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
