"""A gradient chunk costs the model plus as few extra ops as possible (issue 16: time outside
forward/backward). On a 2-core CPU a chunk of the demo CNN takes a few ms, so a per-chunk
torch.cat, einsum or arange is time the run spends outside the model. These tests count the
torch calls an integrate pass makes outside the model and check the cheaper accumulation gives
path_accumulate's values bit for bit (fastattr/engine.py, Engine._integrate)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from fastattr import kernels
from fastattr.engine import Engine, Problem
from fastattr.precision import get_precision
from fastattr.quadrature import points_and_weights

pytestmark = pytest.mark.usefixtures("single_thread")


class _Counter(TorchFunctionMode):
    """Counts torch functions called while the model's own forward is not running."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.in_model = False
        model.register_forward_pre_hook(lambda *_: setattr(self, "in_model", True))
        model.register_forward_hook(lambda *_: setattr(self, "in_model", False))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.in_model:
            self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_step_chunks_make_no_cat_einsum_or_arange(channels_last):
    """Fails on the old engine: it concatenated a chunk's single block of rows (a copy), folded it
    into the accumulator through einsum and built each chunk's example index with arange, per chunk."""
    model = _cnn()
    x, b = torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6) * 0.1
    alphas, weights = points_and_weights("gausslegendre", 8)
    engine = Engine(model, get_precision("fp32"), max_rows=4)  # 16 chunks, each half of one step
    problem = engine.settle_layout(Problem((x,), (b,), torch.arange(8)[:, None] % 5, ()), channels_last)
    counter = _Counter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with counter:
        (acc,) = engine.integrate(problem, alphas, weights)
    assert counter.calls["cat"] == 0 and counter.calls["einsum"] == 0, counter.calls
    assert counter.calls["arange"] <= 1, counter.calls  # once per pass, not per chunk
    # the same integral, step by step over the whole batch (other row counts: float rounding only)
    ref = torch.zeros(8, 3 * 36)
    for a, w in zip(alphas, weights):
        rows = (b + a * (x - b)).requires_grad_(True)
        (g,) = torch.autograd.grad(model(rows).gather(1, (torch.arange(8) % 5)[:, None]).sum(), rows)
        ref += w * g.reshape(8, -1)
    got = problem.layouts[0].user(acc).reshape(8, -1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_one_step_accumulation_equals_path_accumulate_bitwise(dtype, rows):
    """The engine's one-step accumulation (acc += w * g, one product and one sum) gives exactly the
    values of kernels.path_accumulate's einsum for one step: the results did not change."""
    gen = torch.Generator().manual_seed(rows)
    for _ in range(5):
        acc = torch.randn(rows, 3 * 32 * 32, generator=gen, dtype=dtype) * 10
        g = torch.randn(rows, 3 * 32 * 32, generator=gen, dtype=dtype) * torch.rand((), generator=gen, dtype=dtype)
        w = torch.rand(1, generator=gen, dtype=dtype)
        ref = kernels.path_accumulate(acc.clone(), g[None], w, backend="torch")
        assert torch.equal(acc.clone().add_(torch.mul(g, w[0])), ref)


def test_flat_target_follows_in_place_and_replaced_targets():
    """The per-pass flat target index is recomputed when the target changes (a predicted target
    fills in as passes see the inputs), never served stale."""
    problem = Problem((torch.randn(4, 3),), None, torch.tensor([[0, 1], [1, 2], [2, 0], [0, 0]]), ())
    shape = torch.Size([4, 3, 5])
    assert problem.flat_target(shape).tolist() == [1, 7, 10, 0]
    problem.target[3] = torch.tensor([2, 4])
    assert problem.flat_target(shape).tolist() == [1, 7, 10, 14]
    problem.target = torch.tensor([[1, 1]] * 4)
    assert problem.flat_target(shape).tolist() == [6] * 4
    assert problem.flat_target(torch.Size([4, 3, 7])).tolist() == [8] * 4
    with torch.inference_mode():
        problem.target = torch.tensor([[2, 3]] * 4)
    assert problem.flat_target(shape).tolist() == [13] * 4
