"""What the working layout changes: speed, and fp32 numbers against Captum and float64.

    python benchmarks/bench_layout.py [--size 64] [--batch 2] [--steps 16] [--repeat 3]

On benchmarks/models.py's ResNet18 (random init, eval-mode BatchNorm with random statistics)
it runs fp32 IntegratedGradients with channels_last None (the default), True and False, and
Captum's IntegratedGradients, and prints per layout: the best wall time of ``--repeat`` calls and
the relative max error (max |a - b| / max |b|) against Captum and against a float64 run of the
same rule. Channels-last convolutions round differently from NCHW ones; float64 shows that
neither is the more accurate one. Timing and error come from benchmarks/_harness.py (best_of,
max_rel); the first line is the card, date and commit.
"""

from __future__ import annotations

import argparse
import os
import sys

import captum.attr as ca
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
from models import ResNet18, randomize_batchnorm  # noqa: E402

import fastattr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet18(classes=10)).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    target = torch.arange(args.batch) % 10
    ref = ca.IntegratedGradients(model).attribute(x, target=target, n_steps=args.steps)
    exact = fastattr.IntegratedGradients(model.double()).attribute(x.double(), target=target, n_steps=args.steps)
    model.float()
    print(h.env_line(h.env()))
    print(f"ResNet18 {args.batch}x3x{args.size}x{args.size}, IG gausslegendre {args.steps} steps, fp32, {torch.get_num_threads()} threads")
    print(f"{'layout':>14} {'best s':>8} {'vs Captum':>10} {'vs float64':>10}")
    print(f"{'Captum':>14} {'':>8} {'':>10} {h.max_rel(ref, exact):10.2e}")
    ig = fastattr.IntegratedGradients(model)
    for flag in (None, True, False):
        seconds, _, got = h.best_of(lambda f=flag: ig.attribute(x, target=target, n_steps=args.steps, channels_last=f), "cpu", args.repeat)
        print(f"{str(flag):>14} {seconds:8.3f} {h.max_rel(got, ref):10.2e} {h.max_rel(got, exact):10.2e}")


if __name__ == "__main__":
    main()
