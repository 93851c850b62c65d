"""Channels-last is a speed choice only: it never breaks a model, and results do not depend on it.

The most common CNN pattern, ``x.view(x.size(0), -1)`` after a convolution, fails on
channels-last strides. fastattr starts such 4-D problems channels-last on CPU; when the first
gradient chunk fails it reruns the pass in the inputs' own layout, remembers the model's verdict
and logs once (fastattr/engine.py, Engine.settle_layout).
"""

from __future__ import annotations

import logging

import captum.attr as ca
import numpy as np
import pytest
import torch
import torch.nn as nn
from captum.testing.helpers.basic_models import BasicModel_ConvNet, BasicModel_ConvNet_One_Conv
from models import assert_attr_close

import fastattr

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]


def _x(batch: int = 2) -> torch.Tensor:
    return torch.arange(16.0).view(1, 1, 4, 4).repeat(batch, 1, 1, 1)  # the repro input


def _pairs(model: nn.Module):
    """(name, fastattr call, Captum call) over every gradient class, on the same arguments."""
    refs = torch.linspace(-1, 1, 3 * 16).view(3, 1, 4, 4)
    return [
        ("saliency", lambda: fastattr.Saliency(model).attribute(_x(), target=0), lambda: ca.Saliency(model).attribute(_x(), target=0)),
        ("input_x_gradient", lambda: fastattr.InputXGradient(model).attribute(_x(), target=0), lambda: ca.InputXGradient(model).attribute(_x(), target=0)),
        (
            "integrated_gradients",
            lambda: fastattr.IntegratedGradients(model).attribute(_x(), target=0, n_steps=8, return_convergence_delta=True),
            lambda: ca.IntegratedGradients(model).attribute(_x(), target=0, n_steps=8, return_convergence_delta=True),
        ),
        (
            "integrated_gradients_auto",
            lambda: fastattr.IntegratedGradients(model).attribute(_x(), target=0, n_steps="auto", method="gausslegendre"),
            None,
        ),
        ("gradient_shap", lambda: _seeded(lambda: fastattr.GradientShap(model).attribute(_x(), refs, n_samples=3, target=0)), lambda: _seeded(lambda: ca.GradientShap(model).attribute(_x(), refs, n_samples=3, target=0))),
        (
            "noise_tunnel",
            lambda: _seeded(lambda: fastattr.NoiseTunnel(fastattr.IntegratedGradients(model)).attribute(_x(), nt_samples=3, stdevs=0.5, target=0, n_steps=4)),
            lambda: _seeded(lambda: ca.NoiseTunnel(ca.IntegratedGradients(model)).attribute(_x(), nt_samples=3, stdevs=0.5, target=0, n_steps=4)),
        ),
        (
            "layer_integrated_gradients",  # the layer's output is a 4-D conv activation, viewed by the next line
            lambda: fastattr.LayerIntegratedGradients(model, model.conv1).attribute(_x(), target=0, n_steps=8),
            lambda: ca.LayerIntegratedGradients(model, model.conv1).attribute(_x(), target=0, n_steps=8),
        ),
    ]


def _seeded(fn):
    torch.manual_seed(3)
    np.random.seed(3)
    return fn()


@pytest.mark.parametrize("case", [p[0] for p in _pairs(BasicModel_ConvNet_One_Conv())])
def test_view_after_conv_works_in_every_class(case):
    """Fails on the old default (channels-last on CPU): 'view size is not compatible'."""
    model = BasicModel_ConvNet_One_Conv()
    _, ours, theirs = next(p for p in _pairs(model) if p[0] == case)
    got = ours()
    if theirs is not None:
        ref = theirs()
        if isinstance(got, tuple):
            assert_attr_close(got[0], ref[0])
            torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
        else:
            assert_attr_close(got, ref)


def test_results_do_not_depend_on_the_layout():
    """A model that runs either way: the default (channels-last on CPU) equals the inputs' layout
    to float rounding, and a model that falls back gives exactly the inputs' layout's numbers."""
    model = BasicModel_ConvNet()
    x = torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    ig = fastattr.IntegratedGradients(model)
    default = ig.attribute(x, target=1, n_steps=16)
    for flag in (True, False):
        assert_attr_close(ig.attribute(x, target=1, n_steps=16, channels_last=flag), default)
    viewing = BasicModel_ConvNet_One_Conv()
    y = _x(3) + torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ig = fastattr.IntegratedGradients(viewing)
    torch.testing.assert_close(ig.attribute(y, target=1, n_steps=16), ig.attribute(y, target=1, n_steps=16, channels_last=False), rtol=0, atol=0)


def test_fallback_is_remembered_per_model_and_logged_once(caplog):
    model = BasicModel_ConvNet_One_Conv()
    rows: list[int] = []
    model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
    sal = fastattr.Saliency(model)
    with caplog.at_level(logging.INFO, logger="fastattr.engine"):
        for _ in range(3):
            sal.attribute(_x(4), target=0, max_rows=4)
        fastattr.IntegratedGradients(model).attribute(_x(4), target=0, n_steps=2, internal_batch_size=4)
    notes = [r for r in caplog.records if "channels-last" in r.getMessage()]
    assert len(notes) == 1 and "BasicModel_ConvNet_One_Conv" in notes[0].getMessage()
    # the failed channels-last chunk ran once (4 rows), then every pass ran in the inputs' layout
    assert rows == [4] + [4] * 3 + [4, 4]


def test_explicit_channels_last_is_obeyed():
    """channels_last=True is the user's choice: no fallback, the model's own error."""
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        fastattr.Saliency(BasicModel_ConvNet_One_Conv()).attribute(_x(), target=0, channels_last=True)


def test_model_errors_in_both_layouts_surface_unchanged():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            raise RuntimeError("broken model")

    with pytest.raises(RuntimeError, match="broken model"):
        fastattr.IntegratedGradients(Broken()).attribute(_x(), target=0, n_steps=2)


class _NoConv(nn.Module):
    """An image model without convolutions (like benchmarks/bench_store.py's NearFree)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3).view(3, 1, 1))
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(x * self.scale).mean((2, 3)))


class _FunctionalConv(nn.Module):
    """A convolution called through torch.nn.functional: not seen, so the inputs' own layout."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight).mean((2, 3))


def _layouts_seen(model: nn.Module, **kw) -> set[bool]:
    """Whether the gradient passes' rows reached the model channels-last (per forward)."""
    seen: set[bool] = set()
    model.register_forward_pre_hook(lambda m, a: seen.add(not a[0].is_contiguous()) if torch.is_grad_enabled() else None)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=4, **kw)
    fastattr.Saliency(model).attribute(x, target=1, **kw)
    return seen


def test_cpu_channels_last_only_for_models_with_convolutions():
    """Fails on the old default (every 4-D input channels-last on CPU): a model without convolution
    modules gains nothing from it and pays copies (its gradient comes back in NCHW order)."""
    assert _layouts_seen(_NoConv()) == {False}
    assert _layouts_seen(_FunctionalConv()) == {False}
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(4))
    conv(torch.zeros(1, 3, 6, 6))  # materialize the lazy layer
    assert _layouts_seen(conv) == {True}
    # an explicit choice is obeyed either way, and the numbers do not depend on it
    assert _layouts_seen(_NoConv(), channels_last=True) == {True}
    assert _layouts_seen(conv, channels_last=False) == {False}
    model, x = _NoConv(), torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    ig = fastattr.IntegratedGradients(model)
    assert_attr_close(ig.attribute(x, target=1, n_steps=8), ig.attribute(x, target=1, n_steps=8, channels_last=True))


def test_use_channels_last_rule():
    cpu, cuda, fp32, bf16 = torch.device("cpu"), torch.device("cuda"), fastattr.precision.get_precision("fp32"), fastattr.precision.get_precision("bf16")
    conv, lin = nn.Sequential(nn.ConvTranspose2d(3, 3, 1)), nn.Linear(3, 3)
    use = fastattr.engine.use_channels_last
    assert use(None, cpu, fp32, conv) and use(None, cpu, fp32, conv.forward)  # a module or its bound method
    assert not use(None, cpu, fp32, lin) and not use(None, cpu, fp32, lambda x: conv(x))  # a plain function is not searched
    assert use(True, cpu, fp32, lin) and not use(False, cpu, fp32, conv)
    assert use(None, cpu, fp32)  # model not given: the old rule (benchmarks)
    assert use(None, cuda, bf16, lin) and not use(None, cuda, fp32, conv)  # CUDA: unchanged
