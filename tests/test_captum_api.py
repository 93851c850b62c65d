"""Captum's API on fastattr's classes: the properties, methods and arguments a Captum user calls.

multiplies_by_inputs and has_convergence_delta() with Captum's values on every class;
compute_convergence_delta on IntegratedGradients, GradientShap and LayerIntegratedGradients;
grad_kwargs on LayerIntegratedGradients; LayerActivation's layer input as a tensor;
NoiseTunnel over LayerIntegratedGradients and over Captum's own methods (the generic path).
"""

from __future__ import annotations

import inspect

import captum.attr as ca
import numpy as np
import pytest
import torch
import torch.nn as nn
from captum.testing.helpers.basic_models import BasicModel_ConvNet_One_Conv, BasicModel_MultiLayer

import fastattr

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]


def _model() -> BasicModel_MultiLayer:
    torch.manual_seed(0)
    return BasicModel_MultiLayer()


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(1))


def _same(got, ref, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Equal structure (tensor / tuple / list) and values."""
    assert type(got) is type(ref), (type(got), type(ref))
    if isinstance(got, torch.Tensor):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
        return
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        _same(g, r, rtol, atol)


CLASSES = [  # (name, make(fastattr or captum module, model, **kw))
    ("Saliency", lambda mod, m, **kw: mod.Saliency(m)),
    ("InputXGradient", lambda mod, m, **kw: mod.InputXGradient(m, **kw)),
    ("IntegratedGradients", lambda mod, m, **kw: mod.IntegratedGradients(m, **kw)),
    ("GradientShap", lambda mod, m, **kw: mod.GradientShap(m, **kw)),
    ("LayerIntegratedGradients", lambda mod, m, **kw: mod.LayerIntegratedGradients(m, m.linear1, **kw)),
    ("LayerActivation", lambda mod, m, **kw: mod.LayerActivation(m, m.linear1)),
    ("NoiseTunnel", lambda mod, m, **kw: mod.NoiseTunnel(mod.IntegratedGradients(m, **kw))),
    ("NoiseTunnel_Saliency", lambda mod, m, **kw: mod.NoiseTunnel(mod.Saliency(m))),
]


@pytest.mark.parametrize("mbi", [None, False])
@pytest.mark.parametrize("name", [c[0] for c in CLASSES])
def test_multiplies_by_inputs_and_has_convergence_delta_as_captum(name, mbi):
    make = dict(CLASSES)[name]
    kw = {} if mbi is None or name in ("Saliency", "InputXGradient", "LayerActivation", "NoiseTunnel_Saliency") else {"multiply_by_inputs": mbi}
    ours, theirs = make(fastattr, _model(), **kw), make(ca, _model(), **kw)
    assert ours.multiplies_by_inputs is theirs.multiplies_by_inputs
    assert ours.has_convergence_delta() is theirs.has_convergence_delta()


def test_attribute_signatures_keep_captums_parameters():
    """help() / inspect show Captum's positional parameters, in Captum's order."""
    for name in ("Saliency", "IntegratedGradients", "GradientShap", "LayerIntegratedGradients", "LayerActivation", "NoiseTunnel"):
        ours = [p.name for p in inspect.signature(getattr(fastattr, name).attribute).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        theirs = [p.name for p in inspect.signature(getattr(ca, name).attribute).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert ours == theirs[: len(ours)] and len(ours) >= len(theirs) - 1, (name, ours, theirs)  # LIG: grad_kwargs positional in both


@pytest.mark.parametrize("start", [None, 0.5, "tensor"])
def test_compute_convergence_delta_ig_and_gradient_shap(start):
    model, x = _model(), _x()
    start_point = torch.randn(1, 3, generator=torch.Generator().manual_seed(4)) if start == "tensor" else start
    for make in (lambda mod: mod.IntegratedGradients(model), lambda mod: mod.GradientShap(model)):
        attr = fastattr.IntegratedGradients(model).attribute(x, baselines=start_point, target=[0, 1, 1], n_steps=5)
        got = make(fastattr).compute_convergence_delta(attr, start_point, x, target=[0, 1, 1])
        ref = make(ca).compute_convergence_delta(attr, start_point, x, target=[0, 1, 1])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the delta attribute() reports is this residual
    attr, delta = fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=5, return_convergence_delta=True)
    torch.testing.assert_close(fastattr.IntegratedGradients(model).compute_convergence_delta(attr, None, x, target=1), delta, rtol=1e-5, atol=1e-5)


def test_compute_convergence_delta_layer_ig_and_forward_args():
    model, x = _model(), _x()
    lig, clig = fastattr.LayerIntegratedGradients(model, model.linear1), ca.LayerIntegratedGradients(model, model.linear1)
    add = torch.full((3, 3), 0.25)
    attr = lig.attribute(x, target=0, n_steps=6, additional_forward_args=(add,))
    got = lig.compute_convergence_delta(attr, 0.1, x, target=0, additional_forward_args=(add,))
    ref = clig.compute_convergence_delta(attr, 0.1, x, target=0, additional_forward_args=(add,))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="must match on the first dimension"):  # AttributionInputError, as Captum asserts
        lig.compute_convergence_delta(attr[:2], 0.1, x, target=0)


def test_grad_kwargs_materialize_grads_gives_zeros_for_an_unused_layer():
    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 4), nn.Linear(3, 2)

        def forward(self, x):
            self.unused(x)  # runs, but the output does not depend on it
            return self.used(x)

    torch.manual_seed(0)
    model, x = SideBranch(), _x()
    with pytest.raises(fastattr.NoGradientError, match="materialize_grads"):
        fastattr.LayerIntegratedGradients(model, model.unused).attribute(x, target=0)
    got = fastattr.LayerIntegratedGradients(model, model.unused).attribute(x, target=0, grad_kwargs={"materialize_grads": True})
    ref = ca.LayerIntegratedGradients(model, model.unused).attribute(x, target=0, grad_kwargs={"materialize_grads": True})
    _same(got, ref)
    assert not got.any()
    # Captum's own case: BasicModel_MultiLayer(multi_input_module=True) runs relu off the output path
    torch.manual_seed(0)
    model = BasicModel_MultiLayer(multi_input_module=True)
    for layer in (model.relu, [model.relu, model.multi_relu]):
        got = fastattr.LayerIntegratedGradients(model, layer).attribute(x, target=0, grad_kwargs={"materialize_grads": True})
        _same(got, ca.LayerIntegratedGradients(model, layer).attribute(x, target=0, grad_kwargs={"materialize_grads": True}))
    # a list of layers where one feeds the other: the upstream one gets zeros, as in Captum
    model = _model()
    layers = [model.linear1, model.linear2]
    got = fastattr.LayerIntegratedGradients(model, layers).attribute(x, target=0, grad_kwargs={"materialize_grads": True})
    ref = ca.LayerIntegratedGradients(model, layers).attribute(x, target=0, grad_kwargs={"materialize_grads": True})
    _same(got, ref)
    with pytest.raises(fastattr.errors.OptionError, match="grad_kwargs supports materialize_grads"):
        fastattr.LayerIntegratedGradients(model, model.linear1).attribute(x, target=0, grad_kwargs={"create_graph": True})


def test_layer_activation_of_a_single_input_layer_is_a_tensor():
    model, x = _model(), _x()
    for layer in (model.linear1, [model.linear1, model.linear2]):
        got = fastattr.LayerActivation(model, layer).attribute(x, attribute_to_layer_input=True)
        ref = ca.LayerActivation(model, layer).attribute(x, attribute_to_layer_input=True)
        _same(got, ref)
    lig = fastattr.LayerIntegratedGradients(model, model.linear1).attribute(x, target=0, attribute_to_layer_input=True)
    _same(lig, ca.LayerIntegratedGradients(model, model.linear1).attribute(x, target=0, attribute_to_layer_input=True))


def _both(ours, theirs, x, **kw):
    torch.manual_seed(5)
    np.random.seed(5)
    got = ours.attribute(x, **kw)
    torch.manual_seed(5)
    np.random.seed(5)
    return got, theirs.attribute(x, **kw)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_noise_tunnel_over_layer_integrated_gradients(nt_type):
    model, x = _model(), _x()
    parallel = BasicModel_MultiLayer(multi_input_module=True)
    for net, layer in ((model, model.linear1), (parallel, parallel.multi_relu)):
        got, ref = _both(
            fastattr.NoiseTunnel(fastattr.LayerIntegratedGradients(net, layer)), ca.NoiseTunnel(ca.LayerIntegratedGradients(net, layer)), x,
            nt_type=nt_type, nt_samples=4, nt_samples_batch_size=3, stdevs=0.1, target=0, n_steps=6, return_convergence_delta=True,
        )  # fmt: skip
        _same(got, ref)
    # a list of layers (Captum's NoiseTunnel cannot format that): Captum's structure, a list per layer
    two = fastattr.NoiseTunnel(fastattr.LayerIntegratedGradients(parallel, [parallel.linear1, parallel.linear1_alt]))
    got = two.attribute(x, nt_type=nt_type, nt_samples=3, stdevs=0.1, target=0, n_steps=4, seed=1)
    assert isinstance(got, list) and [tuple(t.shape) for t in got] == [(3, 4), (3, 4)]
    # the batched path's row cap holds over the layer method too
    rows: list[int] = []
    model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    fastattr.NoiseTunnel(fastattr.LayerIntegratedGradients(model, model.linear1)).attribute(x, nt_samples=5, stdevs=0.1, target=0, n_steps=7, internal_batch_size=4, seed=0)
    assert rows and max(rows) <= 4


GENERIC = {  # Captum methods fastattr does not implement, through NoiseTunnel's generic path
    "deeplift": (lambda m: ca.DeepLift(m), {"baselines": torch.zeros(1, 3), "return_convergence_delta": True}),
    "guided_backprop": (lambda m: ca.GuidedBackprop(m), {}),
    "feature_ablation": (lambda m: ca.FeatureAblation(m), {"feature_mask": torch.tensor([[0, 0, 1]])}),
    "captum_ig_distrib": (lambda m: ca.IntegratedGradients(m), {"baselines": torch.randn(7, 3, generator=torch.Generator().manual_seed(9)), "draw_baseline_from_distrib": True, "n_steps": 5}),
}


@pytest.mark.parametrize("nsbs", [None, 2])
@pytest.mark.parametrize("case", list(GENERIC))
def test_noise_tunnel_over_other_captum_methods(case, nsbs):
    make, kw = GENERIC[case]
    model, x = _model(), _x()
    got, ref = _both(fastattr.NoiseTunnel(make(model)), ca.NoiseTunnel(make(model)), x, nt_samples=5, nt_samples_batch_size=nsbs, stdevs=0.2, target=[0, 1, 1], **kw)
    _same(got, ref, rtol=0, atol=0)  # the same calls in the same order: bit for bit


def test_noise_tunnel_generic_batch_result():
    model, x = _model(), _x()
    res = fastattr.NoiseTunnel(ca.DeepLift(model)).attribute_batch(x, nt_samples=4, stdevs=0.2, target=0, baselines=torch.zeros(1, 3), with_delta=True)
    assert res.attributions[0].shape == x.shape and res.delta.shape == (3,) and res.copy_delta.shape == (12,)
    torch.testing.assert_close(res.stats.sum, res.attributions[0].sum(1), rtol=1e-5, atol=1e-6)


def test_noise_tunnel_over_layer_activation_and_conv_captum_method():
    model, x = _model(), _x()
    got, ref = _both(fastattr.NoiseTunnel(fastattr.LayerActivation(model, model.linear1)), ca.NoiseTunnel(ca.LayerActivation(model, model.linear1)), x, nt_samples=3, stdevs=0.2)
    _same(got, ref, rtol=0, atol=0)
    conv = BasicModel_ConvNet_One_Conv()
    img = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    got, ref = _both(fastattr.NoiseTunnel(ca.GuidedGradCam(conv, conv.conv1)), ca.NoiseTunnel(ca.GuidedGradCam(conv, conv.conv1)), img, nt_samples=3, stdevs=0.5, target=1)
    _same(got, ref, rtol=0, atol=0)


def test_noise_tunnel_over_a_non_attribution_is_a_type_error():
    with pytest.raises(TypeError, match="NoiseTunnel wraps an attribution object"):
        fastattr.NoiseTunnel(_model())


def test_captums_own_wrappers_take_fastattr_methods():
    """Captum code calls attribute.__wrapped__ (its NoiseTunnel does) and attribute_future; both work
    as on Captum's classes."""
    model, x = _model(), _x()
    got, ref = _both(ca.NoiseTunnel(fastattr.IntegratedGradients(model)), ca.NoiseTunnel(ca.IntegratedGradients(model)), x, nt_samples=3, stdevs=0.1, target=1, n_steps=5)
    _same(got, ref)
    assert inspect.getfullargspec(fastattr.IntegratedGradients.attribute.__wrapped__).args[:3] == ["self", "inputs", "baselines"]
    with pytest.raises(NotImplementedError):
        fastattr.Saliency(model).attribute_future(x)
