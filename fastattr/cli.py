"""The ``fastattr`` command line (also ``python -m fastattr``)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .precision import PRECISIONS


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(samples=args.samples, n_steps=args.steps, precision=args.precision, device=args.device)
    print("\n".join(report.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastattr", description="Fast, Captum-compatible batch attribution for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastattr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and debug details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on synthetic data with known answers and attribute it")
    demo.add_argument("--samples", type=int, default=2000, help="test samples to attribute (default 2000)")
    demo.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (default 32)")
    demo.add_argument("--precision", choices=PRECISIONS, default="fp32")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
