"""fastattr.LayerGradientXActivation against Captum's: outputs, inputs, lists of layers, chunking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastattr
from fastattr.errors import AttributionInputError

captum_attr = pytest.importorskip("captum.attr")


class Pair(nn.Module):
    """A layer returning a tuple: (float, int, float)."""

    def forward(self, x):
        return x.tanh(), x.argmax(1), x * 2


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.pair, self.out = nn.Linear(5, 6), Pair(), nn.Linear(12, 3)

    def forward(self, x):
        a, _, b = self.pair(self.lin(x))
        return self.out(torch.cat([a, b], 1))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("mbi", [True, False])
@pytest.mark.parametrize("to_input", [False, True])
def test_matches_captum(mlp, mbi, to_input):
    x = torch.randn(7, 5)
    got = fastattr.LayerGradientXActivation(mlp, mlp[1], multiply_by_inputs=mbi).attribute(
        x, target=1, attribute_to_layer_input=to_input, internal_batch_size=3
    )
    want = captum_attr.LayerGradientXActivation(mlp, mlp[1], multiply_by_inputs=mbi).attribute(x, target=1, attribute_to_layer_input=to_input)
    torch.testing.assert_close(got, want)


def test_list_of_dependent_layers_matches_captum(mlp):
    x, t = torch.randn(6, 5), torch.arange(6) % 3
    got = fastattr.LayerGradientXActivation(mlp, [mlp[0], mlp[2]]).attribute(x, target=t)
    want = captum_attr.LayerGradientXActivation(mlp, [mlp[0], mlp[2]]).attribute(x, target=t)
    assert isinstance(got, list) and len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_tuple_valued_layer_attributes_float_parts():
    torch.manual_seed(1)
    m = TupleNet()
    x = torch.randn(4, 5)
    got = fastattr.LayerGradientXActivation(m, m.pair).attribute(x, target=2)
    assert isinstance(got, tuple) and len(got) == 2  # the int part passes through, unattributed
    leaf = m.lin(x).detach().requires_grad_(True)
    a, b = leaf.tanh(), leaf * 2
    a.retain_grad(), b.retain_grad()
    m.out(torch.cat([a, b], 1))[:, 2].sum().backward()
    torch.testing.assert_close(got[0], a.grad * a.detach())
    torch.testing.assert_close(got[1], b.grad * b.detach())


def test_errors(mlp):
    gxa = fastattr.LayerGradientXActivation(mlp, mlp[1])
    assert not gxa.has_convergence_delta() and gxa.multiplies_by_inputs
    with pytest.raises(AttributionInputError):
        gxa.attribute(torch.randn(3, 5), target=1, internal_batch_size=0)
    with pytest.raises(ValueError, match="not a submodule"):
        fastattr.LayerGradientXActivation(mlp, nn.Linear(2, 2))


class Branches(nn.Module):
    """``unused`` runs but the output does not depend on it (Captum's multi_input_module case)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 4)

    def forward(self, x):
        self.unused(x)
        return self.used(x)


def test_grad_kwargs_materialize_grads_gives_zeros_for_an_unused_layer():
    m, x = Branches(), torch.randn(3, 5)
    got = fastattr.LayerGradientXActivation(m, [m.used, m.unused]).attribute(x, target=0, grad_kwargs={"materialize_grads": True})
    want = captum_attr.LayerGradientXActivation(m, [m.used, m.unused]).attribute(x, target=0, grad_kwargs={"materialize_grads": True})
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not got[1].any()
    with pytest.raises(fastattr.errors.NoGradientError):  # without it, as before: an error naming the cause
        fastattr.LayerGradientXActivation(m, [m.used, m.unused]).attribute(x, target=0)


def test_works_under_no_grad_and_on_model_outputs(mlp):
    """Captum's tests call attribute under torch.no_grad(); a ModelOutput-like result gives its .logits."""
    x = torch.randn(4, 5)
    want = captum_attr.LayerGradientXActivation(mlp, mlp[1]).attribute(x, target=2)
    with torch.no_grad():
        got = fastattr.LayerGradientXActivation(mlp, mlp[1]).attribute(x, target=2)
    torch.testing.assert_close(got, want)

    class Out(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp

        def forward(self, x):
            return {"logits": self.net(x), "hidden": x}

    wrapped = Out()
    torch.testing.assert_close(fastattr.LayerGradientXActivation(wrapped, wrapped.net[1]).attribute(x, target=2), want)
