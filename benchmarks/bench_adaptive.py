"""Accuracy vs wall time: fastattr n_steps="auto" at several tolerances vs Captum's fixed steps.

Models: the demo's small CNN (ReLU) trained on the demo's synthetic images, and the same CNN
with GELU activations trained the same way. Error: relative L2 of the attributions against a
float64 reference (fastattr float64, Gauss-Legendre, --ref-steps) on the first --ref-samples
samples, target = label, zero baselines. Every timed point is the median of --repeats runs
after a warm-up. Captum runs with internal_batch_size = samples (one step of the whole batch
per forward, its fastest setting on this CNN in benchmarks/RESULTS.md) and its defaults
otherwise. Writes JSON and a PNG (error vs time) into benchmarks/results/ and prints a
Markdown table, including the issue-8 target: the accuracy of Captum's default (Gauss-Legendre,
50 steps, fp32) in at most half of Captum's time.

    python benchmarks/bench_adaptive.py                       # full settings
    python benchmarks/bench_adaptive.py --samples 32 --repeats 1 --ref-steps 512   # quick check
    python benchmarks/bench_adaptive.py --device cuda       # timings synchronize on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
from _harness import RESULTS, rel_err  # noqa: E402

import fastattr  # noqa: E402
from fastattr import adaptive  # noqa: E402
from fastattr.demo import make_dataset, make_model, train  # noqa: E402

warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")


def gelu_cnn() -> nn.Module:
    """The demo CNN with GELU in place of ReLU and average in place of max pooling: a smooth
    model of the same size (max pooling alone puts kinks on every path)."""
    model = make_model()
    for i, m in enumerate(model):
        if isinstance(m, nn.ReLU):
            model[i] = nn.GELU()
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            model[i] = nn.AdaptiveAvgPool2d(1)
    return model


@dataclass
class Point:
    model: str
    impl: str
    setting: str
    seconds: float
    rel_err: float
    mean_steps: float
    not_converged: int = 0
    max_rel_delta: float | None = None  # max |delta| / |F(x) - F(x0)| over the samples


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds after a warm-up (the CPU row tuner settles), synchronized on CUDA."""
    seconds, _, out = h.timed(fn, device, repeats, memory=False)
    return seconds, out


def run_model(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace) -> list[Point]:
    from captum.attr import IntegratedGradients as CaptumIG

    n, device = x.shape[0], x.device
    ref = fastattr.IntegratedGradients(copy.deepcopy(model).double()).attribute(x[: args.ref_samples].double(), target=target[: args.ref_samples], n_steps=args.ref_steps)
    points: list[Point] = []
    for precision in args.precisions:
        # Captum has no precision option: bf16 runs it under CPU autocast, as a user would
        cast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        for method in ("gausslegendre", "riemann_middle"):
            for steps in args.captum_steps:
                with cast:
                    sec, out = timed(lambda s=steps, m=method: CaptumIG(model).attribute(x, target=target, n_steps=s, method=m, internal_batch_size=n), args.repeats, device)
                points.append(Point(name, f"captum {precision}", f"{method} {steps}", sec, rel_err(out.float(), ref), steps))
                print(f"  {name} captum {precision} {method} {steps}: {sec:.3f} s", file=sys.stderr, flush=True)
    ig = fastattr.IntegratedGradients(model)
    sec, out = timed(lambda: ig.attribute(x, target=target, n_steps=50), args.repeats, device)
    points.append(Point(name, "fastattr fp32", "gausslegendre 50", sec, rel_err(out, ref), 50))
    for precision, rule in [(p, r) for p in args.precisions for r in args.rules]:
        for tol in args.tolerances:
            # "gausslegendre@12": the rule with min_steps=12 (the first level's points)
            rule_name, _, n0 = rule.partition("@")
            extra = {"min_steps": int(n0)} if n0 else {}
            sec, res = timed(
                lambda t=tol, p=precision, r=rule_name, e=extra: ig.attribute_batch(x, target=target, n_steps="auto", method=r, tolerance=t, max_steps=args.max_steps, precision=p, **e),
                args.repeats,
                device,
            )
            summary = adaptive.summarize_steps(res.n_steps, res.extras["converged"])
            rel_delta = res.delta.abs() / (res.output - res.baseline_output).abs().clamp_min(1e-12)
            impl = f"fastattr auto {rule} {precision}"
            points.append(Point(name, impl, f"tol {tol:g}", sec, rel_err(res.attributions[0], ref), summary["mean_steps"], summary["not_converged"], float(rel_delta.max())))
            print(f"  {name} {impl} tol {tol:g}: {sec:.3f} s, steps {summary['histogram']}", file=sys.stderr, flush=True)
    return points


def adaptive_run(ig: fastattr.IntegratedGradients, x: torch.Tensor, target: torch.Tensor, **settings: object) -> object:
    """The adaptive driver with every setting exposed (the rule study toggles the agreement check)."""
    from fastattr.engine import Engine, frozen_parameters
    from fastattr.options import Options
    from fastattr.precision import get_precision

    policy = get_precision("fp32")
    engine = Engine(ig.forward_func, policy)
    problem, _ = ig._problem(engine, Options(), x, None, target, None, with_path=True)
    with frozen_parameters(ig.forward_func):
        res = adaptive.integrate_adaptive(engine, problem, adaptive.AdaptiveSettings.check(**settings))
    attrs, _ = engine.finalize(problem, res.accs, multiply_by_inputs=True)
    res.attributions = attrs
    return res


def rule_study(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace) -> list[str]:
    """Which nested rule reaches a given accuracy with fewest gradient evaluations: every sample
    pinned to n points (min_steps = max_steps = n), and adaptive at each tolerance (mean steps)."""
    x, target = x[: args.ref_samples], target[: args.ref_samples]
    ref = fastattr.IntegratedGradients(copy.deepcopy(model).double()).attribute(x.double(), target=target, n_steps=args.ref_steps)
    ig = fastattr.IntegratedGradients(model)
    lines = []
    for rule, agree in [(r, a) for r in adaptive.RULES for a in ((False, True) if r in adaptive.NESTED else (True,))]:
        fixed = []
        for n in (5, 9, 17, 33, 65, 129) if rule in adaptive.NESTED else ():
            res = ig.attribute_batch(x, target=target, n_steps="auto", method=rule, min_steps=n, max_steps=n)
            fixed.append(f"{n}: {rel_err(res.attributions[0], ref):.1e}")
        auto = []
        for tol in args.tolerances:
            res = adaptive_run(ig, x, target, rule=rule, tolerance=tol, max_steps=args.max_steps, agreement=agree)
            auto.append(f"{tol:g}: {float(res.n_steps.double().mean()):.0f} steps, {rel_err(res.attributions[0], ref):.1e}")
        lines.append(f"| {name} | {rule}{' + agreement' if agree else ''} | {'; '.join(fixed)} | {'; '.join(auto)} |")
    for n in (8, 16, 32, 64):
        lines.append(f"| {name} | fixed gausslegendre {n} | {rel_err(ig.attribute(x, target=target, n_steps=n), ref):.1e} | - |")
    return lines


def table(points: list[Point]) -> str:
    lines = [
        "| model | implementation | setting | time (s) | mean steps | rel. error vs fp64 | samples at cap | max abs(delta)/abs(dF) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        rd = "-" if p.max_rel_delta is None else f"{p.max_rel_delta:.1e}"
        lines.append(f"| {p.model} | {p.impl} | {p.setting} | {p.seconds:.3f} | {p.mean_steps:.1f} | {p.rel_err:.2e} | {p.not_converged} | {rd} |")
    return "\n".join(lines)


def target_lines(points: list[Point]) -> list[str]:
    """Issue 8's target per model: the cheapest auto point at least as accurate as Captum GL-50 fp32."""
    out = []
    for model in dict.fromkeys(p.model for p in points):
        base = next((p for p in points if p.model == model and p.impl == "captum fp32" and p.setting == "gausslegendre 50"), None)
        # "at the same precision": each auto precision is timed against Captum at that precision
        bases = {p.impl.split()[-1]: p for p in points if p.model == model and p.impl.startswith("captum") and p.setting == "gausslegendre 50"}
        if base is None:
            continue
        for impl in dict.fromkeys(p.impl for p in points if p.model == model and p.impl.startswith("fastattr auto")):
            ok = [p for p in points if p.model == model and p.impl == impl and p.rel_err <= base.rel_err]
            if not ok:
                out.append(f"- {model}, {impl}: no tolerance reached Captum GL-50's error {base.rel_err:.2e}")
                continue
            best = min(ok, key=lambda p: p.seconds)
            same = bases.get(impl.split()[-1], base)
            ratio = best.seconds / same.seconds
            out.append(
                f"- {model}, {impl}: {best.setting} reaches error {best.rel_err:.2e} (Captum GL-50 fp32: {base.rel_err:.2e}) in "
                f"{best.seconds:.3f} s = {ratio:.2f}x Captum GL-50 {same.impl.split()[-1]}'s {same.seconds:.3f} s ({'met' if ratio <= 0.5 else 'not met'}: target <= 0.5x)"
            )
    return out


def plot(points: list[Point], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(p.model for p in points))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        groups: dict[str, list[Point]] = {}
        for p in points:
            if p.model == model:
                key = p.impl if not p.impl.startswith("captum") else f"{p.impl} {p.setting.split()[0]}"
                groups.setdefault(key, []).append(p)
        for key, ps in groups.items():
            ps = sorted(ps, key=lambda p: p.seconds)
            ax.plot([p.seconds for p in ps], [p.rel_err for p in ps], "o-" if len(ps) > 1 else "s", label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("relative L2 error vs float64 reference")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--ref-samples", type=int, default=16)
    parser.add_argument("--ref-steps", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerances", default="0.1,0.03,0.01,0.001,0.0001")
    parser.add_argument("--rules", default="gausslegendre,simpson", help="adaptive rules to time; rule@n sets min_steps=n")
    parser.add_argument("--captum-steps", default="16,32,50,64,128,256")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--max-steps", type=int, default=257)
    parser.add_argument("--models", default="relu_cnn,gelu_cnn")
    parser.add_argument("--train-samples", type=int, default=2000, help="demo images the models are trained on")
    parser.add_argument("--rule-study", action="store_true", help="only compare the nested rules at equal steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG (default benchmarks/results)")
    parser.add_argument("--tag", default=None, help="result file name (default <date>-<device>-adaptive)")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.tag = args.tag or time.strftime("%Y-%m-%d") + f"-{torch.device(args.device).type}-adaptive"
    args.tolerances = [float(t) for t in args.tolerances.split(",")]
    args.captum_steps = [int(s) for s in args.captum_steps.split(",")]
    args.precisions = args.precisions.split(",")
    args.rules = args.rules.split(",")
    return args


def run(args: argparse.Namespace) -> tuple[list[Point], list[str]]:
    """Train each model on the demo data, then the timed points (or, with --rule-study, the study's table lines)."""
    device = torch.device(args.device)
    h.true_fp32()
    images, labels, _ = make_dataset(args.train_samples, seed=0)
    test_x, test_y, _ = make_dataset(args.samples, seed=1)
    builders = {"relu_cnn": make_model, "gelu_cnn": gelu_cnn}
    points: list[Point] = []
    study: list[str] = []
    for name in args.models.split(","):
        model = builders[name]()
        acc = train(model, images, labels)
        model = model.to(device)
        x, y = test_x.to(device), test_y.to(device)
        print(f"[{name}: train accuracy {acc:.3f}]", file=sys.stderr, flush=True)
        with h.stage_timer(name):
            if args.rule_study:
                study += rule_study(name, model, x, y, args)
            else:
                points += run_model(name, model, x, y, args)
    return points, study


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    points, study = run(args)
    if args.rule_study:
        print("| model | rule | error at n points (every sample) | adaptive: tolerance: mean steps, error |\n| --- | --- | --- | --- |")
        print("\n".join(study))
        return 0
    device = torch.device(args.device)
    h.write_json(os.path.join(args.out, f"{args.tag}.json"), {"args": vars(args), "points": points}, device)
    plot(points, os.path.join(args.out, f"{args.tag}.png"))
    env = f"{h.env_line(h.env(device))}, {args.samples} samples"
    print(f"\n{env}\n\n{table(points)}\n\n" + "\n".join(target_lines(points)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
