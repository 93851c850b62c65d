"""GradientShap: parity with Captum 0.9 on the same draws, row budget, seeded streams, errors.

With seed=None fastattr draws baseline indices (numpy), noise (torch) and alphas (numpy)
from the global RNGs in Captum's order, so seeding both before each call gives both the
same draws; fp32 results then agree to rounding.
"""

from __future__ import annotations

import captum.attr as ca
import numpy as np
import pytest
import torch
from models import CallCounter, assert_attr_close, make, make_inputs, make_mask

import fastattr
from fastattr.errors import AttributionInputError, OptionError
from fastattr.sources import ArraySource

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]

B = 3


def refs_for(shape: tuple[int, ...], n: int = 7, seed: int = 9) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def pair(model, inputs, baselines, seed: int = 5, mbi: bool = True, **kw):
    torch.manual_seed(seed)
    np.random.seed(seed)
    got = fastattr.GradientShap(model, mbi).attribute(inputs, baselines, return_convergence_delta=True, **kw)
    torch.manual_seed(seed)
    np.random.seed(seed)
    ref = ca.GradientShap(model, mbi).attribute(inputs, baselines, return_convergence_delta=True, **kw)
    return got, ref


def check(got, ref) -> None:
    (a, d), (r, rd) = got, ref
    assert_attr_close(a, r)
    assert d.shape == rd.shape
    torch.testing.assert_close(d, rd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stdevs", [0.0, 0.3])
@pytest.mark.parametrize("mbi", [True, False], ids=["mult", "nomult"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_parity_models(name, mbi, stdevs):
    model, (x,) = make(name), make_inputs(name, B)
    got, ref = pair(model, x, refs_for(x.shape[1:]), mbi=mbi, n_samples=6, stdevs=stdevs, target=[0, 2, 1])
    check(got, ref)


def test_parity_tuple_inputs_and_forward_args():
    model, xs = make("two_input"), make_inputs("two_input", B)
    refs = (refs_for((6,), 5), refs_for((2, 4), 4, seed=3))
    got, ref = pair(model, xs, refs, n_samples=4, stdevs=(0.1, 0.2), target=3)
    check(got, ref)
    model, (x,) = make("with_args"), make_inputs("with_args", B)
    got, ref = pair(model, x, refs_for((10,)), n_samples=5, target=[2, 0, 1], additional_forward_args=(make_mask(B), 2.0))
    check(got, ref)


def test_parity_callable_baselines():
    model, (x,) = make("mlp"), make_inputs("mlp", B)
    refs = refs_for((12,))
    got, ref = pair(model, x, lambda inputs: refs * 0.5 + inputs.mean(), n_samples=3, target=1)
    check(got, ref)


def test_rows_per_forward_stay_under_the_cap():
    model, (x,) = make("cnn"), make_inputs("cnn", 6)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    res = fastattr.GradientShap(model).attribute_batch(x, refs_for((3, 8, 8)), n_samples=20, stdevs=0.1, target=2, max_rows=5)
    assert max(rows) <= 5
    assert sum(rows) >= 6 * 20 * 3  # gradient rows + F(x_j) + F(x0_j) per copy
    assert res.attributions[0].shape == x.shape


def test_seeded_draws_do_not_depend_on_batching_or_grouping():
    model, (x,) = make("mlp"), make_inputs("mlp", 5)
    refs = refs_for((12,))
    gs = fastattr.GradientShap(model)
    target = torch.tensor([0, 1, 2, 3, 4])
    whole = gs.attribute_batch(x, refs, n_samples=8, stdevs=0.2, target=target, seed=7, sample_ids=torch.arange(50, 55))
    parts = [
        gs.attribute_batch(x[a:b], refs, n_samples=8, stdevs=0.2, target=target[a:b], seed=7, sample_ids=torch.arange(50 + a, 50 + b), n_samples_batch_size=3)
        for a, b in ((0, 2), (2, 5))
    ]
    torch.testing.assert_close(torch.cat([p.attributions[0] for p in parts]), whole.attributions[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.cat([p.delta for p in parts]), whole.delta, rtol=1e-5, atol=1e-7)


def test_reference_source_matches_tensor_reference():
    """A dataset reference set (read lazily, drawn rows only) gives the tensor reference's result."""
    model, (x,) = make("mlp"), make_inputs("mlp", B)
    refs = refs_for((12,))
    gs = fastattr.GradientShap(model)
    a = gs.attribute_batch(x, refs, n_samples=4, target=1, seed=3)
    b = gs.attribute_batch(x, ArraySource(refs.numpy()), n_samples=4, target=1, seed=3)
    torch.testing.assert_close(a.attributions[0], b.attributions[0], rtol=0, atol=0)


def test_linear_model_completeness_and_fields():
    """On a linear model every copy is complete: delta_j = 0, and the attribution is w * mean(x_j - x0_j)."""
    model, x = make("linear"), torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    refs = refs_for((7,), 5)
    res = fastattr.GradientShap(model).attribute_batch(x, refs, n_samples=6, stdevs=0.3, seed=2)
    torch.testing.assert_close(res.delta, torch.zeros(4), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(res.output, model(x))
    torch.testing.assert_close(res.stats.sum, res.extras["noisy_output"] - res.baseline_output, rtol=1e-5, atol=1e-5)
    assert res.n_steps == 6 and res.extras["sem"].shape == (4,) and bool((res.extras["sem"] > 0).all())
    # no noise and a single reference row: exactly (x - x0) * w
    one = fastattr.GradientShap(model).attribute(x, refs[:1], n_samples=3, seed=0)
    torch.testing.assert_close(one, (x - refs[:1]) * model.w.detach(), rtol=1e-5, atol=1e-6)


ERRORS = {  # invalid inputs: AttributionInputError (also an AssertionError, as Captum's); invalid options: OptionError
    "none": ({"baselines": None}, AttributionInputError, "GradientShap needs baselines"),
    "empty": ({"baselines": torch.zeros(0, 12)}, AttributionInputError, "is empty"),
    "shape": ({"baselines": torch.zeros(3, 11)}, AttributionInputError, "rows must have input 0's shape"),
    "count": ({"baselines": (torch.zeros(3, 12), torch.zeros(3, 12))}, AttributionInputError, "2 baseline distributions for 1 inputs"),
    "n_samples": ({"baselines": torch.zeros(3, 12), "n_samples": 0}, OptionError, "n_samples must be a positive int"),
    "stdevs": ({"baselines": torch.zeros(3, 12), "stdevs": (0.1, 0.1)}, AttributionInputError, "got 2 stdevs for 1 inputs"),
    "caps": ({"baselines": torch.zeros(3, 12), "max_rows": 4, "internal_batch_size": 8}, OptionError, "disagree"),
    "empty_source": ({"baselines": ArraySource(np.zeros((0, 12), dtype=np.float32))}, AttributionInputError, "source is empty"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_before_any_forward(case):
    kw, exc, msg = ERRORS[case]
    model = CallCounter()
    with pytest.raises(exc, match=msg):
        fastattr.GradientShap(model).attribute(torch.randn(2, 12), target=0, **kw)
    assert model.calls == 0
