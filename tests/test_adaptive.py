"""Adaptive integrated gradients (n_steps="auto"): tolerance met or cap reported, evaluation
reuse (gradient rows == steps reported), row budget, convergence to a float64 reference,
the nested rules against fixed rules, and argument errors raised before any model work."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn as nn
from models import make, make_inputs, rel_l2

import fastattr
from fastattr import adaptive
from fastattr.engine import Engine
from fastattr.options import Options
from fastattr.precision import get_precision

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]


@contextlib.contextmanager
def grad_rows(model: nn.Module):
    """Rows of every forward, split into gradient forwards (grad enabled) and forward-only ones."""
    rec: dict[str, list[int]] = {"grad": [], "nograd": []}
    handle = model.register_forward_pre_hook(lambda mod, args: rec["grad" if torch.is_grad_enabled() else "nograd"].append(args[0].shape[0]))
    try:
        yield rec
    finally:
        handle.remove()


def _case(name: str, batch: int = 5):
    model = make(name)
    xs = make_inputs(name, batch)
    target = None if name in ("smooth", "single") else torch.arange(batch) % 3
    return model, (xs if len(xs) > 1 else xs[0]), target


def _assert_tolerance(res, tol: float, abs_tol: float, cap: int) -> None:
    """Every converged sample meets the tolerance; every other one used the cap and is reported."""
    conv = res.extras["converged"]
    allowed = torch.clamp(tol * (res.output - res.baseline_output).abs(), min=abs_tol)
    slack = 1e-5 * (res.output.abs() + res.baseline_output.abs()) + 1e-6  # fp32 rounding of sum(attr)
    assert bool((res.delta.abs()[conv] <= allowed[conv] + slack[conv]).all()), (res.delta, allowed, conv)
    assert bool((res.n_steps[~conv] == cap).all())
    assert res.n_steps.dtype == torch.int64 and res.n_steps.shape == res.delta.shape


# --------------------------------------------------------------------------- tolerance or cap


@pytest.mark.parametrize("rule", adaptive.RULES)
@pytest.mark.parametrize("name", ["mlp", "cnn", "smooth", "two_input"])
def test_tolerance_met_or_cap_reported(name, rule):
    model, inputs, target = _case(name)
    res = fastattr.IntegratedGradients(model).attribute_batch(inputs, target=target, n_steps="auto", method=rule, tolerance=0.02, max_steps=129)
    _assert_tolerance(res, 0.02, adaptive.DEFAULT_ABS_TOLERANCE, adaptive.AdaptiveSettings.check(rule=rule, max_steps=129).cap)
    assert bool(res.extras["converged"].any())


@pytest.mark.parametrize("rule", adaptive.RULES)
def test_analytic_paper_models(rule):
    """BasicModel2/3 (one ReLU kink on the path): converged samples meet the tolerance, capped
    ones are reported, and the attributions approach the closed form (1.5, -0.5) at (3, 1).
    (Gauss-Legendre converges only O(1/n) across a kink, so it may stop at the cap here.)"""
    x1, x2 = torch.tensor([3.0, 4.0, 2.5, 0.5]), torch.tensor([1.0, 1.0, 0.5, 2.0])
    for name in ("basic2", "basic3"):
        res = fastattr.IntegratedGradients(make(name)).attribute_batch((x1, x2), n_steps="auto", method=rule, tolerance=1e-3, max_steps=1025)
        _assert_tolerance(res, 1e-3, adaptive.DEFAULT_ABS_TOLERANCE, adaptive.AdaptiveSettings.check(rule=rule, max_steps=1025).cap)
        a1, a2 = res.attributions
        if rule in adaptive.NESTED:
            assert bool(res.extras["converged"].all())
        torch.testing.assert_close(torch.stack([a1[0], a2[0]]), torch.tensor([1.5, -0.5]), rtol=0, atol=2e-3)


@pytest.mark.parametrize("rule, cap", [("simpson", 17), ("gausslegendre", 56)])
def test_cap_reported_and_logged(caplog, rule, cap):
    """Caps: simpson, the largest 2^k + 1 <= 20; gausslegendre, 8 + 16 + 32 <= 60 (levels of 8, 16, 32)."""
    model, inputs, target = _case("cnn", 4)
    with caplog.at_level(logging.INFO, logger="fastattr.adaptive"):
        res = fastattr.IntegratedGradients(model).attribute_batch(
            inputs, target=target, n_steps="auto", method=rule, tolerance=1e-9, abs_tolerance=0.0, max_steps=20 if rule == "simpson" else 60
        )
    assert res.n_steps.tolist() == [cap] * 4
    assert not bool(res.extras["converged"].any())
    assert any("did not reach tolerance" in r.getMessage() for r in caplog.records)
    summary = adaptive.summarize_steps(res.n_steps, res.extras["converged"])
    assert summary["histogram"] == {cap: 4} and summary["not_converged"] == 4 and summary["not_converged_index"] == [0, 1, 2, 3]


def test_steps_differ_per_sample():
    model, inputs, target = _case("mlp", 8)
    res = fastattr.IntegratedGradients(model).attribute_batch(inputs, target=target, n_steps="auto", tolerance=0.05, max_steps=257)
    assert len(set(res.n_steps.tolist())) > 1, res.n_steps


# --------------------------------------------------------------------------- reuse and budget


@pytest.mark.parametrize("rule", adaptive.RULES)
@pytest.mark.parametrize("ibs", [None, 7])
def test_gradient_rows_equal_steps_and_budget(ibs, rule):
    """fp32: rows through the gradient forwards == sum of steps reported; forward-only rows:
    none for the dyadic rules (F(x), F(x0) come from the gradient forwards), exactly 2 per
    sample for gausslegendre (F(x), F(x0)); no forward exceeds the row cap."""
    model, inputs, target = _case("mlp", 6)
    with grad_rows(model) as rec:
        res = fastattr.IntegratedGradients(model).attribute_batch(inputs, target=target, n_steps="auto", method=rule, tolerance=0.02, internal_batch_size=ibs)
    assert sum(rec["grad"]) == int(res.n_steps.sum())
    assert sum(rec["nograd"]) == (12 if rule == "gausslegendre" else 0)
    if ibs is not None:
        assert max(rec["grad"]) <= ibs


@pytest.mark.parametrize("rule", adaptive.RULES)
def test_bf16_counts_and_fp32_path_values(rule):
    """Under bf16 the gradient rows still equal the steps; F (at every grid point for the dyadic
    rules, at x and x0 for gausslegendre) is evaluated by fp32 forward-only passes, which never
    exceed the row cap either."""
    model, inputs, target = _case("mlp", 4)
    with grad_rows(model) as rec:
        res = fastattr.IntegratedGradients(model).attribute_batch(
            inputs, target=target, n_steps="auto", method=rule, tolerance=0.05, precision="bf16", internal_batch_size=9, max_steps=56
        )
    assert sum(rec["grad"]) == int(res.n_steps.sum())
    assert sum(rec["nograd"]) == (8 if rule == "gausslegendre" else int(res.n_steps.sum()))
    assert max(rec["grad"] + rec["nograd"]) <= 9
    with torch.no_grad():
        f = model(inputs).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(res.output, f)  # endpoints in fp32, not bf16


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("name", ["smooth", "mlp"])
def test_converges_to_float64_reference(name):
    model, inputs, target = _case(name, 4)
    ref = fastattr.IntegratedGradients(make(name).double()).attribute(inputs.double(), target=target, n_steps=2048)
    errs, steps = [], []
    for tol in (0.1, 0.01, 0.001):
        res = fastattr.IntegratedGradients(model).attribute_batch(inputs, target=target, n_steps="auto", tolerance=tol, max_steps=1025)
        errs.append(rel_l2(res.attributions[0], ref.float()))
        steps.append(int(res.n_steps.sum()))
    # the smooth model sits at the fp32 floor from the loosest tolerance on (Gauss is spectral there)
    assert errs[2] <= errs[1] * 1.05 and errs[1] <= errs[0] * 1.05, errs
    assert name == "smooth" or errs[2] < errs[0], errs
    assert steps[0] <= steps[1] <= steps[2]
    assert errs[2] < (2e-4 if name == "smooth" else 5e-3), errs


def test_gauss_levels_match_fixed_gauss():
    """gausslegendre with min_steps=4, max_steps=12 runs levels of 4 and 8 fresh points: 12
    evaluations, and the result is exactly fastattr's fixed 8-point Gauss-Legendre."""
    model, inputs, target = _case("cnn", 3)
    ig = fastattr.IntegratedGradients(model)
    res = ig.attribute_batch(inputs, target=target, n_steps="auto", method="gausslegendre", tolerance=1e-9, abs_tolerance=0.0, min_steps=4, max_steps=12)
    assert res.n_steps.tolist() == [12, 12, 12] and not bool(res.extras["converged"].any())
    torch.testing.assert_close(res.attributions[0], ig.attribute(inputs, target=target, n_steps=8), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", adaptive.NESTED)
def test_fixed_level_matches_fixed_rule(rule):
    """min_steps = max_steps = 9 pins every sample to 9 points: trapezoid equals fastattr's
    fixed 9-point trapezoid, Simpson equals the 1-4-2-...-4-1 weights applied by hand."""
    model, inputs, target = _case("cnn", 3)
    ig = fastattr.IntegratedGradients(model)
    res = ig.attribute_batch(inputs, target=target, n_steps="auto", method=rule, min_steps=9, max_steps=9)
    assert res.n_steps.tolist() == [9, 9, 9]
    if rule == "trapezoid":
        ref = ig.attribute(inputs, target=target, n_steps=9, method="trapezoid")
    else:
        w = torch.tensor([1, 4, 2, 4, 2, 4, 2, 4, 1], dtype=torch.float32) / 24
        grads = torch.stack([_grad(model, inputs * (j / 8), target) for j in range(9)])
        ref = inputs * torch.einsum("s,sbchw->bchw", w, grads)
    torch.testing.assert_close(res.attributions[0], ref, rtol=1e-4, atol=1e-5)


def _grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)[0]


def test_float64_inputs():
    model, inputs, target = _case("smooth", 3)
    res = fastattr.IntegratedGradients(model.double()).attribute_batch(inputs.double(), target=target, n_steps="auto", tolerance=1e-6, max_steps=513)
    assert res.attributions[0].dtype == torch.float64 and res.delta.dtype == torch.float64
    _assert_tolerance(res, 1e-6, adaptive.DEFAULT_ABS_TOLERANCE, 513)
    assert bool(res.extras["converged"].all())


def test_attribute_returns_delta_and_multiplies():
    model, inputs, target = _case("mlp", 3)
    attr, delta = fastattr.IntegratedGradients(model).attribute(inputs, target=target, n_steps="auto", tolerance=0.01, return_convergence_delta=True)
    plain = fastattr.IntegratedGradients(model, multiply_by_inputs=False).attribute(inputs, target=target, n_steps="auto", tolerance=0.01)
    torch.testing.assert_close(attr, plain * inputs)  # same grids: deterministic refinement
    assert attr.shape == inputs.shape and delta.shape == (3,)


# --------------------------------------------------------------------------- engine pass over pairs


def test_integrate_pairs_matches_integrate():
    """A uniform grid handed to integrate_pairs as (example, alpha, weight) pairs, in a shuffled
    order and with a row cap that splits examples, equals Engine.integrate on that grid."""
    model, inputs, target = _case("cnn", 3)
    ig = fastattr.IntegratedGradients(model)
    engine = Engine(model, get_precision("fp32"), max_rows=5)
    problem, _ = ig._problem(engine, Options(), inputs, None, target, None, with_path=True)
    alphas, weights = fastattr.quadrature.points_and_weights("gausslegendre", 6)
    ref = engine.integrate(problem, alphas, weights)
    ex = torch.arange(3).repeat(6)
    a = torch.tensor(alphas).repeat_interleave(3)
    w = torch.tensor(weights).repeat_interleave(3)
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    accs = (torch.zeros_like(ref[0]),)
    outs, dots = engine.integrate_pairs(problem, ex[perm], a[perm], w[perm], accs)
    torch.testing.assert_close(accs[0], ref[0], rtol=1e-5, atol=1e-6)
    assert outs.shape == dots.shape == (18,)
    with pytest.raises(ValueError, match="example_idx must lie"):
        engine.integrate_pairs(problem, torch.tensor([3]), torch.tensor([0.5]), torch.tensor([1.0]), accs)


# --------------------------------------------------------------------------- errors, before any work


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_steps": "fast"}, "n_steps must be"),
        ({"n_steps": 16, "tolerance": 0.01}, "only apply with n_steps='auto'"),
        ({"n_steps": "auto", "tolerance": 0.0}, "tolerance must be"),
        ({"n_steps": "auto", "tolerance": float("nan")}, "tolerance must be"),
        ({"n_steps": "auto", "abs_tolerance": -1.0}, "abs_tolerance must be"),
        ({"n_steps": "auto", "max_steps": 2}, "max_steps must be"),
        ({"n_steps": "auto", "min_steps": 17, "max_steps": 9}, "must be >= min_steps"),
        ({"n_steps": "auto", "min_steps": 10, "max_steps": 12}, "leaves no level"),
        ({"n_steps": "auto", "method": "gausslegendre", "max_steps": 20}, "gausslegendre needs two levels"),
        ({"n_steps": "auto", "method": "riemann_left"}, "refines only the rules"),
    ],
)
def test_errors_before_work(kwargs, match):
    model, inputs, target = _case("mlp", 2)
    with grad_rows(model) as rec, pytest.raises(ValueError, match=match):
        fastattr.IntegratedGradients(model).attribute(inputs, target=target, **kwargs)
    assert rec == {"grad": [], "nograd": []}


def test_default_rule_is_simpson_and_fixed_steps_keep_captums_default():
    """method=None: the adaptive default (simpson, chosen by measurement) with n_steps='auto', and
    Captum's gausslegendre with a fixed n_steps."""
    model, inputs, target = _case("cnn", 3)
    ig = fastattr.IntegratedGradients(model)
    auto = ig.attribute_batch(inputs, target=target, n_steps="auto", tolerance=0.05)
    simpson = ig.attribute_batch(inputs, target=target, n_steps="auto", method="simpson", tolerance=0.05)
    torch.testing.assert_close(auto.attributions[0], simpson.attributions[0], rtol=0, atol=0)
    assert ((auto.n_steps - 1) & (auto.n_steps - 2) == 0).all()  # 2^k + 1 points: the dyadic grid
    fixed = ig.attribute(inputs, target=target, n_steps=16)
    torch.testing.assert_close(fixed, ig.attribute(inputs, target=target, n_steps=16, method="gausslegendre"), rtol=0, atol=0)
