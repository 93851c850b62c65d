"""fastattr vs Captum LayerIntegratedGradients, side by side in one process.

Case: a small transformer text classifier (benchmarks/models.py TokenClassifier: vocab 1000, dim 64,
4 heads, 2 GELU encoder blocks, 4 classes) on 32 padded sequences of 64 tokens
(lengths 16..64, attention mask as an additional forward arg), IG on the token
embedding, Gauss-Legendre 50 steps, zero (PAD) baselines. Same model, data and settings
for both. The "trim_padding" rows also pass the lengths: fastattr's padding-aware pass
(rows sorted by length, each chunk cut to its longest real length, exactness checked).

Reported per implementation: median wall time of the repeats, the ratio to Captum with
its defaults and to Captum with the best internal_batch_size of a sweep, peak memory
(CPU: resident set size sampled every 2 ms above the level after a malloc_trim, during
the untimed first call; CUDA: max_memory_allocated), and the relative L2 error on the
first 8 samples against a float64 reference (Captum LayerIG on a float64 copy of the
model, 512 Gauss-Legendre steps).

    python benchmarks/bench_layer.py                       # CPU, writes benchmarks/results/<date>-cpu-layer.json
    python benchmarks/bench_layer.py --device cuda --samples 256
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness as h  # noqa: E402
from _harness import Row, rel_err  # noqa: E402
from models import TokenClassifier, token_batch  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")
warnings.filterwarnings("ignore", message=".*Multiple layers provided.*")

CASE = "transformer T=64 LayerIG(embed)"
REF_SAMPLES, REF_STEPS = 8, 512


def build(
    samples: int, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = TokenClassifier(vocab=1000, dim=64, heads=4, layers=2, classes=4, max_len=64, seed=0).to(device)
    ids, mask, lengths = token_batch(samples, 64, vocab=1000, min_len=16, seed=1)
    target = torch.randint(0, 4, (samples,), generator=torch.Generator().manual_seed(2))
    return model, ids.to(device), mask.to(device), target.to(device), lengths.to(device)


def reference(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, n: int = REF_SAMPLES, steps: int = REF_STEPS
) -> torch.Tensor:
    from captum.attr import LayerIntegratedGradients as CaptumLIG

    m64 = copy.deepcopy(model).double()
    return (
        CaptumLIG(m64, m64.embed)
        .attribute(ids[:n], None, target[:n], (mask[:n].double(),), n_steps=steps, internal_batch_size=64 * n)
        .cpu()
    )


def run(
    device: str, samples: int, n_steps: int, repeats: int, precisions: list[str],
    ref_samples: int = REF_SAMPLES, ref_steps: int = REF_STEPS, sweep: tuple[int, ...] = (1, 2, 5, 10, 25),
) -> list[Row]:  # fmt: skip
    from captum.attr import LayerIntegratedGradients as CaptumLIG

    dev = torch.device(device)
    h.true_fp32()  # Captum's fp32 is true fp32
    model, ids, mask, target, lengths = build(samples, dev)
    ref = reference(model, ids, mask, target, ref_samples, ref_steps)
    rows: list[Row] = []

    def captum(ibs: int | None) -> Callable[[], torch.Tensor]:
        return lambda: CaptumLIG(model, model.embed).attribute(
            ids, None, target, (mask,), n_steps=n_steps, internal_batch_size=ibs
        )

    def attempt(label: str, fn: Callable[[], torch.Tensor], reps: int, ref: torch.Tensor = ref) -> Row:
        try:
            seconds, peak, out = h.timed(fn, dev, reps)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return Row(CASE, label, None, None, None, note="out of memory")
        return Row(CASE, label, seconds, peak, rel_err(out, ref))

    default = attempt("captum (defaults)", captum(None), repeats)
    rows.append(default)
    timings = []
    for steps_per_chunk in sweep:  # Captum's internal_batch_size splits steps only
        r = attempt(f"captum ibs={steps_per_chunk * samples}", captum(steps_per_chunk * samples), 1)
        if r.seconds is not None:
            timings.append((r.seconds, steps_per_chunk * samples))
    best_ibs = min(timings)[1]
    best = attempt(f"captum best (ibs={best_ibs})", captum(best_ibs), repeats)
    rows.append(best)
    lig = fastattr.LayerIntegratedGradients(model, model.embed)
    for p in precisions:
        rows.append(
            attempt(
                f"fastattr {p}",
                lambda p=p: lig.attribute(ids, None, target, (mask,), n_steps=n_steps, precision=p),
                repeats,
            )
        )
    # padding-aware pass: rows sorted by length, each chunk cut to its longest row (exact for
    # this model, which masks padded keys and pools over real tokens; checked in every call)
    for p in precisions:
        rows.append(
            attempt(
                f"fastattr {p} trim_padding",
                lambda p=p: lig.attribute(
                    ids, None, target, (mask,), n_steps=n_steps, precision=p, lengths=lengths, trim_padding=True
                ),
                repeats,
            )
        )
        rows[-1].note = f"mean length {float(lengths.float().mean()):.1f} of 64"
    # what a dataset run stores: per-token sums, with F(x), F(x0), delta and stats
    rows.append(
        attempt(
            "fastattr fp32 attribute_batch(reduce='sum')",
            lambda: lig.attribute_batch(ids, None, target, (mask,), n_steps=n_steps, reduce="sum").attributions[0],
            repeats,
            ref=ref.sum(-1),
        )
    )
    rows[-1].note = "per-token (B, T) sums; error vs the reference's per-token sums"
    # the same with lengths="mask" as a dataset run passes them: attribute_batch trims by default
    rows.append(
        attempt(
            "fastattr fp32 attribute_batch(reduce='sum', lengths)",
            lambda: lig.attribute_batch(
                ids, None, target, (mask,), n_steps=n_steps, reduce="sum", lengths=lengths
            ).attributions[0],
            repeats,
            ref=ref.sum(-1),
        )
    )
    rows[-1].note = "trim_padding on by default with lengths; per-token sums"
    h.speedups(rows, default, best)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precisions", default=None, help="comma-separated; default fp32,bf16 (CPU) or fp32,tf32,bf16,fp16 (CUDA)"
    )
    parser.add_argument("--json", default=None, help="default: benchmarks/results/<date>-<device>-layer.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    precisions = (
        args.precisions.split(",")
        if args.precisions
        else (["fp32", "tf32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    )
    t0 = time.perf_counter()
    rows = run(args.device, args.samples, args.n_steps, args.repeats, precisions)
    path = args.json or os.path.join(h.RESULTS, f"{datetime.date.today()}-{'cuda' if cuda else 'cpu'}-layer.json")
    h.write_json(path, {"samples": args.samples, "n_steps": args.n_steps, "rows": rows}, args.device)
    print(
        f"\n{h.env_line(h.env(args.device))}; {args.samples} samples x 64 tokens, GL-{args.n_steps}; {time.perf_counter() - t0:.0f} s; -> {path}\n\n{h.table(rows)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
