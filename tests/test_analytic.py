"""Analytic answers for integrated gradients (Sundararajan et al. 2017 and Captum's own tests).

- BasicModel2 / BasicModel3 at (x1=3, x2=1) with zero baselines: (1.5, -0.5), as in Captum's
  test_integrated_gradients_basic.py (n_steps=500, tolerance 0.05, |delta| < 0.07).
- Linear models: IG = w * (x - x0) for every rule, except Captum's riemann_trapezoid, whose
  weights sum to 1 - 1/n and so scale every attribution by that factor (a Captum quirk kept
  for parity; fastattr's "trapezoid" is the correct rule).
- Completeness, convergence in n_steps, implementation invariance, float64 parity.
"""

from __future__ import annotations

import captum.attr as ca
import pytest
import torch
import torch.nn as nn
from models import as_tuple, make, make_inputs

import fastattr

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]

ALL_RULES = fastattr.RULES
CAPTUM_RULES = tuple(r for r in ALL_RULES if r != "trapezoid")


def ig(model, inputs, **kw):
    return fastattr.IntegratedGradients(model, multiply_by_inputs=kw.pop("mbi", True)).attribute(inputs, **kw)


# --------------------------------------------------------------------------- Captum's basic models


@pytest.mark.parametrize("mbi", [True, False], ids=["mult", "nomult"])
@pytest.mark.parametrize("method", ALL_RULES)
@pytest.mark.parametrize("name", ["basic2", "basic3"])
def test_paper_models_captum_values(name, method, mbi):
    """Captum's _assert_multi_variable: 1-D inputs (3.,) and (1.,), zero baselines, n_steps=500."""
    model = make(name)
    inputs = (torch.tensor([3.0]), torch.tensor([1.0]))
    baselines = (torch.tensor([0.0]), torch.tensor([0.0]))
    (a1, a2), delta = ig(model, inputs, baselines=baselines, method=method, n_steps=500, mbi=mbi, return_convergence_delta=True)
    assert a1.shape == a2.shape == delta.shape == (1,)
    torch.testing.assert_close(a1, torch.tensor([1.5 if mbi else 0.5]), rtol=0, atol=0.05)
    torch.testing.assert_close(a2, torch.tensor([-0.5]), rtol=0, atol=0.05)
    if mbi:
        assert float(delta.abs()) < 0.07


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right", "riemann_middle", "trapezoid"])
@pytest.mark.parametrize("name", ["basic2", "basic3"])
def test_paper_models_exact(name, method):
    """The path crosses the kink at alpha = 1/2; these rules put it between points, so the
    answer is exact up to the rule's error on one step: (1.5, -0.5), completeness holds."""
    model = make(name)
    (a1, a2), delta = ig(model, (torch.tensor([3.0]), torch.tensor([1.0])), method=method, n_steps=500, return_convergence_delta=True)
    torch.testing.assert_close(a1, torch.tensor([1.5]), rtol=0, atol=1e-5)
    torch.testing.assert_close(a2, torch.tensor([-0.5]), rtol=0, atol=1e-5)
    assert float(delta.abs()) < 1e-5


def test_paper_models_implementation_invariance():
    """Captum: BasicModel2 and BasicModel3 compute the same function at these points, so the
    attribution sums agree."""
    inputs = (torch.tensor([3.0]), torch.tensor([1.0]))
    for method in CAPTUM_RULES:
        s2 = sum(ig(make("basic2"), inputs, method=method, n_steps=500))
        s3 = sum(ig(make("basic3"), inputs, method=method, n_steps=500))
        torch.testing.assert_close(s2, s3, rtol=1e-6, atol=1e-6)


def test_paper_models_batched():
    """Several (x1, x2) points at once: equal to one-example runs, and for BasicModel2 to its
    closed form (along the path f = relu(a (x1 - x2) - 1): gradients (1, -1) past the kink)."""
    x1 = torch.tensor([3.0, 4.0, 2.5, 0.5])
    x2 = torch.tensor([1.0, 1.0, 0.5, 2.0])
    for name in ("basic2", "basic3"):
        model = make(name)
        (a1, a2), delta = ig(model, (x1, x2), method="gausslegendre", n_steps=500, return_convergence_delta=True)
        for i in range(4):
            (b1, b2), d = ig(model, (x1[i : i + 1], x2[i : i + 1]), method="gausslegendre", n_steps=500, return_convergence_delta=True)
            torch.testing.assert_close(torch.stack([a1[i], a2[i], delta[i]]), torch.cat([b1, b2, d]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a1 + a2, model(x1, x2) - model(0 * x1, 0 * x2), rtol=0, atol=1e-2)
        if name == "basic2":
            t = torch.where(x1 - x2 > 1, 1 - 1 / (x1 - x2), torch.zeros_like(x1))
            # Gauss-Legendre's error at the kink is below one step's weight
            torch.testing.assert_close(a1, x1 * t, rtol=0, atol=1e-2)
            torch.testing.assert_close(a2, -x2 * t, rtol=0, atol=1e-2)
        assert float(delta.abs().max()) < 1e-2


@pytest.mark.parametrize("method", CAPTUM_RULES)
@pytest.mark.parametrize(
    "x, baseline, expected",
    [(1.0, 0.0, 1.0), (0.0, 0.0, 0.0), (-1.0, 0.00001, -1.00001)],
)
def test_univariable_captum_cases(x, baseline, expected, method):
    """Captum's _assert_univariable on BasicModel (f = 1 - relu(1 - x) = min(x, 1))."""
    a, delta = ig(make("basic"), torch.tensor([x]), baselines=baseline, method=method, n_steps=500, return_convergence_delta=True)
    assert a.shape == delta.shape == (1,)
    # Captum's tolerances: rules that sample the kink at x = 1 (riemann_right/trapezoid) lose one step
    torch.testing.assert_close(a, torch.tensor([expected]), rtol=0, atol=0.05)
    assert float(delta.abs()) < 0.07


# --------------------------------------------------------------------------- linear models


@pytest.mark.parametrize("n_steps", [2, 7, 50])
@pytest.mark.parametrize("method", ALL_RULES)
def test_linear_model_exact(method, n_steps):
    model = make("linear")
    w = model.w.detach()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g)
    x0 = torch.randn(6, 7, generator=g)
    attr, delta = ig(model, x, baselines=x0, method=method, n_steps=n_steps, return_convergence_delta=True)
    grads = ig(model, x, baselines=x0, method=method, n_steps=n_steps, mbi=False)
    factor = 1 - 1 / n_steps if method == "riemann_trapezoid" else 1.0
    torch.testing.assert_close(attr, factor * w * (x - x0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, factor * w.expand_as(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        df = model(x) - model(x0)
    if method == "riemann_trapezoid":
        # the quirk shows up as a delta of exactly -(1/n) * (F(x) - F(x0))
        torch.testing.assert_close(delta, -df / n_steps, rtol=1e-4, atol=1e-5)
    else:
        assert float(delta.abs().max()) < 1e-5


def test_linear_model_gradient_methods():
    model = make("linear")
    w = model.w.detach()
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fastattr.Saliency(model).attribute(x), w.abs().expand_as(x))
    torch.testing.assert_close(fastattr.Saliency(model).attribute(x, abs=False), w.expand_as(x))
    torch.testing.assert_close(fastattr.InputXGradient(model).attribute(x), w * x)
    torch.testing.assert_close(fastattr.InputXGradient(model, multiply_by_inputs=False).attribute(x), w.expand_as(x))


@pytest.mark.parametrize("n_steps", [2, 5, 64])
def test_quadrature_weights(n_steps):
    for method in ALL_RULES:
        alphas, weights = fastattr.quadrature.points_and_weights(method, n_steps)
        assert len(alphas) == len(weights) == n_steps
        assert all(0.0 <= a <= 1.0 for a in alphas) and list(alphas) == sorted(alphas)
        expected = 1 - 1 / n_steps if method == "riemann_trapezoid" else 1.0
        assert sum(weights) == pytest.approx(expected, abs=1e-12)
    t_alphas, t_weights = fastattr.quadrature.points_and_weights("trapezoid", n_steps)
    r_alphas, r_weights = fastattr.quadrature.points_and_weights("riemann_trapezoid", n_steps)
    assert t_alphas == r_alphas
    assert t_weights[0] == pytest.approx(0.5 / (n_steps - 1)) and t_alphas[0] == 0.0 and t_alphas[-1] == 1.0


# --------------------------------------------------------------------------- completeness / convergence


def _smooth_problem(dtype=torch.float32):
    model = make("smooth").to(dtype)
    x = make_inputs("smooth", 6, seed=3, dtype=dtype)[0] * 2
    return model, x


def test_completeness_gausslegendre_64():
    model, x = _smooth_problem()
    attr, delta = ig(model, x, n_steps=64, method="gausslegendre", return_convergence_delta=True)
    with torch.no_grad():
        df = model(x) - model(torch.zeros_like(x))
    assert float(df.abs().min()) > 1e-3  # the test needs non-trivial output differences
    assert (delta.abs() <= 1e-4 * df.abs() + 1e-7).all(), (delta, df)
    torch.testing.assert_close(attr.sum(1), df, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "method, steps",
    [
        ("gausslegendre", (2, 3, 4, 6, 8)),
        ("riemann_middle", (4, 8, 16, 32, 64)),
        ("riemann_left", (4, 8, 16, 32, 64)),
        ("riemann_right", (4, 8, 16, 32, 64)),
        ("trapezoid", (4, 8, 16, 32, 64)),
    ],
)
def test_delta_shrinks_with_n_steps(method, steps):
    model, x = _smooth_problem(torch.float64)  # float64: no rounding floor in the way
    errs = []
    for n in steps:
        _, delta = ig(model, x, n_steps=n, method=method, return_convergence_delta=True)
        errs.append(float(delta.abs().max()))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 10


def test_trapezoid_converges_riemann_trapezoid_does_not():
    model, x = _smooth_problem(torch.float64)
    ref = ig(model, x, n_steps=256, method="gausslegendre")
    ref_max = float(ref.abs().max())
    prev = None
    for n in (8, 16, 32, 64, 128):
        good = ig(model, x, n_steps=n, method="trapezoid")
        quirk = ig(model, x, n_steps=n, method="riemann_trapezoid")
        err_good = float((good - ref).abs().max())
        err_quirk = float((quirk - ref).abs().max())
        if prev is not None:
            assert err_good < prev / 3  # O(1/n^2)
        prev = err_good
        # Captum's rule is the correct one times (1 - 1/n): its error is O(1/n), not O(1/n^2)
        torch.testing.assert_close(quirk, good * (1 - 1 / n), rtol=1e-12, atol=1e-15)
        assert err_quirk > 0.25 * ref_max / n
        assert err_quirk > n * err_good  # the gap widens with n
    assert prev < 1e-4 * ref_max


# --------------------------------------------------------------------------- implementation invariance


def _split_hidden(mlp: nn.Sequential) -> nn.Sequential:
    """Same function: hidden unit 0 is split into two copies with half the outgoing weight."""
    l1, act, l2 = mlp
    s1 = nn.Linear(l1.in_features, l1.out_features + 1)
    s2 = nn.Linear(l2.in_features + 1, l2.out_features)
    with torch.no_grad():
        s1.weight.copy_(torch.cat([l1.weight, l1.weight[:1]]))
        s1.bias.copy_(torch.cat([l1.bias, l1.bias[:1]]))
        w2 = torch.cat([l2.weight, l2.weight[:, :1] / 2], 1)
        w2[:, 0] /= 2
        s2.weight.copy_(w2)
        s2.bias.copy_(l2.bias)
    return nn.Sequential(s1, act, s2).eval()


def _permute_hidden(mlp: nn.Sequential) -> nn.Sequential:
    l1, act, l2 = mlp
    p = torch.randperm(l1.out_features, generator=torch.Generator().manual_seed(5))
    q1, q2 = nn.Linear(l1.in_features, l1.out_features), nn.Linear(l2.in_features, l2.out_features)
    with torch.no_grad():
        q1.weight.copy_(l1.weight[p])
        q1.bias.copy_(l1.bias[p])
        q2.weight.copy_(l2.weight[:, p])
        q2.bias.copy_(l2.bias)
    return nn.Sequential(q1, act, q2).eval()


@pytest.mark.parametrize("transform", [_split_hidden, _permute_hidden], ids=["split", "permute"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_implementation_invariance(act, transform):
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(6, 10), act(), nn.Linear(10, 3)).eval()
    other = transform(base)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(other(x), base(x), rtol=1e-5, atol=1e-6)
    for method in ("gausslegendre", "riemann_trapezoid", "trapezoid"):
        a, da = ig(base, x, target=1, method=method, n_steps=24, return_convergence_delta=True)
        b, db = ig(other, x, target=1, method=method, n_steps=24, return_convergence_delta=True)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(db, da, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fastattr.Saliency(other).attribute(x, target=2), fastattr.Saliency(base).attribute(x, target=2), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- float64


@pytest.mark.parametrize("mbi", [True, False], ids=["mult", "nomult"])
@pytest.mark.parametrize("method, n_steps", [("riemann_left", 64), ("riemann_right", 32), ("riemann_middle", 16), ("riemann_trapezoid", 64)])
@pytest.mark.parametrize("name", ["smooth", "two_input"])
def test_float64_matches_captum_float64(name, method, n_steps, mbi):
    """Power-of-two n_steps: 1/n is exact in float32, so Captum's float32 step sizes are exact too."""
    model = make(name).double()
    xs = make_inputs(name, 5, dtype=torch.float64)
    inputs = xs if len(xs) > 1 else xs[0]
    target = None if name == "smooth" else 2
    got, delta = fastattr.IntegratedGradients(model, multiply_by_inputs=mbi).attribute(
        inputs, target=target, n_steps=n_steps, method=method, return_convergence_delta=True
    )
    ref, ref_delta = ca.IntegratedGradients(model, multiply_by_inputs=mbi).attribute(
        tuple(x.clone() for x in xs) if len(xs) > 1 else xs[0].clone(), target=target, n_steps=n_steps, method=method, return_convergence_delta=True
    )
    assert delta.dtype == torch.float64
    for g, r in zip(as_tuple(got), as_tuple(ref)):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    torch.testing.assert_close(delta, ref_delta, rtol=0, atol=1e-10)


def test_float64_gausslegendre_matches_captum():
    """Captum rounds its step sizes (Gauss-Legendre weights) to float32 even for float64 inputs;
    fastattr keeps them in float64, so agreement is to float32 weight rounding (~1e-8 relative)."""
    model, x = _smooth_problem(torch.float64)
    got, delta = ig(model, x, n_steps=50, return_convergence_delta=True)
    ref, ref_delta = ca.IntegratedGradients(model).attribute(x.clone(), n_steps=50, return_convergence_delta=True)
    assert got.dtype == delta.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-7, atol=1e-10)
    # and fastattr's own float64 completeness is at float64 rounding
    assert float(delta.abs().max()) < 1e-12


@pytest.mark.parametrize("kind", ["saliency", "input_x_gradient"])
def test_float64_gradient_methods_match_captum(kind):
    model, x = _smooth_problem(torch.float64)
    if kind == "saliency":
        got = fastattr.Saliency(model).attribute(x, abs=False)
        ref = ca.Saliency(model).attribute(x.clone(), abs=False)
    else:
        got = fastattr.InputXGradient(model).attribute(x)
        ref = ca.InputXGradient(model).attribute(x.clone())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_mixed_dtype_tuple_inputs_keep_each_dtype():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3).double()
            self.b = nn.Linear(5, 3)  # float32 layer: needs a float32 x2

        def forward(self, x1, x2):
            return self.a(x1).float() + self.b(x2)

    torch.manual_seed(0)
    model = Mixed().eval()
    x1 = torch.randn(3, 4, dtype=torch.float64)
    x2 = torch.randn(3, 5)
    ref = ca.IntegratedGradients(model).attribute((x1.clone(), x2.clone()), target=0, n_steps=8)
    got = fastattr.IntegratedGradients(model).attribute((x1, x2), target=0, n_steps=8)
    assert [g.dtype for g in got] == [torch.float64, torch.float32]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
