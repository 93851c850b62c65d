"""Parity with Captum 0.9 (captum.attr) for Saliency, InputXGradient and IntegratedGradients.

fastattr uses Captum's exact quadrature points and weights, so fp32 results agree to
rounding (rtol 1e-5, atol 1e-6 scaled by magnitude). Each axis (rule, target form,
baseline form, tuple/single inputs, additional_forward_args, internal_batch_size,
precision) is covered fully with the others at representative values.
"""

from __future__ import annotations

import captum.attr as ca
import pytest
import torch
from models import CLASSES, as_tuple, assert_attr_close, make, make_inputs, make_mask, rel_l2

import fastattr

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]  # Captum warns about requires_grad / internal_batch_size

B = 4
CAPTUM_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
MODELS = ("mlp", "cnn", "two_input", "with_args", "transformer", "multi_dim", "single", "single_keepdim")

# Measured on these cases (CPU, torch 2.13, n_steps=16): worst relative L2 error vs Captum fp32
# was bf16 1.5e-2 and fp16 7.6e-3 (both IG on the BN CNN; Saliency/IxG: bf16 <= 7.5e-3, fp16 <= 1.1e-3).
# Errors move with ReLU kinks (IG on the MLP at other targets reached 4.8e-2 in bf16), hence the headroom.
MIXED_BOUNDS = {"bf16": 5e-2, "fp16": 1.5e-2}


def default_target(name: str, batch: int = B):
    g = torch.Generator().manual_seed(7)
    if name in CLASSES:
        return torch.randint(0, CLASSES[name], (batch,), generator=g).tolist()
    if name == "multi_dim":
        return (2, 1)
    return None  # single-output models


def setup(name: str, batch: int = B):
    """(model, inputs as the user passes them, target, additional_forward_args)."""
    model = make(name)
    xs = make_inputs(name, batch)
    inputs = xs if len(xs) > 1 else xs[0]
    afa = (make_mask(batch), 2.0) if name == "with_args" else None
    return model, inputs, default_target(name, batch), afa


def clone(inputs):
    return tuple(x.clone() for x in inputs) if isinstance(inputs, tuple) else inputs.clone()


def captum_baselines(baselines, inputs):
    """fastattr's baseline forms -> the equivalent form Captum accepts."""
    xs = as_tuple(inputs)

    def one(b, x):
        if b is None:
            return 0.0
        if isinstance(b, torch.Tensor) and b.shape == x.shape[1:]:
            return b.unsqueeze(0)  # Captum wants (1, *features) for a single-sample baseline
        return b

    if baselines is None:
        return None
    if not isinstance(baselines, tuple):
        if isinstance(inputs, tuple) and not isinstance(baselines, torch.Tensor):
            return tuple(one(baselines, x) for x in xs)  # fastattr broadcasts one number to all inputs
        return one(baselines, xs[0])
    return tuple(one(b, x) for b, x in zip(baselines, xs))


def output_scale(model, inputs, afa) -> float:
    with torch.no_grad():
        y = model(*as_tuple(inputs), *(afa if isinstance(afa, tuple) else (() if afa is None else (afa,))))
    return max(1.0, float(y.abs().max()))


def ig_pair(
    model, inputs, *, baselines=None, target=None, afa=None, mbi=True, method="gausslegendre", n_steps=10, ibs=None, precision="fp32", ref_target=...
):
    got, delta = fastattr.IntegratedGradients(model, multiply_by_inputs=mbi).attribute(
        inputs, baselines, target, afa, n_steps=n_steps, method=method, internal_batch_size=ibs,
        return_convergence_delta=True, precision=precision,
    )
    ref, ref_delta = ca.IntegratedGradients(model, multiply_by_inputs=mbi).attribute(
        clone(inputs), captum_baselines(baselines, inputs), target if ref_target is ... else ref_target, afa, n_steps=n_steps, method=method,
        internal_batch_size=ibs, return_convergence_delta=True,
    )
    return got, delta, ref, ref_delta


def check_ig(model, inputs, **kw):
    got, delta, ref, ref_delta = ig_pair(model, inputs, **kw)
    assert isinstance(got, tuple) == isinstance(ref, tuple)
    assert_attr_close(got, ref)
    assert delta.shape == ref_delta.shape == (as_tuple(inputs)[0].shape[0],)
    assert delta.dtype == ref_delta.dtype
    scale = output_scale(model, inputs, kw.get("afa"))
    torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=2e-6 * scale)


GRADIENT_METHODS = ("saliency_abs", "saliency_signed", "input_x_gradient")


def grad_pair(kind: str, model, inputs, target, afa, precision="fp32", ref_target=...):
    ref_target = target if ref_target is ... else ref_target
    if kind == "input_x_gradient":
        got = fastattr.InputXGradient(model).attribute(inputs, target, afa, precision=precision)
        ref = ca.InputXGradient(model).attribute(clone(inputs), ref_target, afa)
    else:
        ab = kind == "saliency_abs"
        got = fastattr.Saliency(model).attribute(inputs, target, ab, afa, precision=precision)
        ref = ca.Saliency(model).attribute(clone(inputs), ref_target, ab, afa)
    return got, ref


def check_any(kind: str, model, inputs, target, afa, **kw):
    if kind in GRADIENT_METHODS:
        got, ref = grad_pair(kind, model, inputs, target, afa, ref_target=kw.get("ref_target", ...))
        assert isinstance(got, tuple) == isinstance(ref, tuple)
        assert_attr_close(got, ref)
    else:
        check_ig(model, inputs, target=target, afa=afa, mbi=kind == "ig", **kw)


ALL_METHODS = (*GRADIENT_METHODS, "ig", "ig_no_mult")


# --------------------------------------------------------------------------- rules x models


@pytest.mark.parametrize("mbi", [True, False], ids=["mult", "nomult"])
@pytest.mark.parametrize("method", CAPTUM_RULES)
@pytest.mark.parametrize("name", MODELS)
def test_ig_rules_models(name, method, mbi):
    model, inputs, target, afa = setup(name)
    check_ig(model, inputs, target=target, afa=afa, mbi=mbi, method=method, n_steps=10)


@pytest.mark.parametrize("n_steps", [2, 3, 17, 50])
@pytest.mark.parametrize("method", CAPTUM_RULES)
def test_ig_n_steps(method, n_steps):
    model, inputs, target, afa = setup("transformer")
    check_ig(model, inputs, target=target, method=method, n_steps=n_steps)


@pytest.mark.parametrize("kind", GRADIENT_METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_gradient_methods_models(name, kind):
    model, inputs, target, afa = setup(name)
    check_any(kind, model, inputs, target, afa)


# --------------------------------------------------------------------------- target forms

TARGETS = {
    "int": ("mlp", 3),
    "int_negative": ("mlp", -1),
    "list": ("mlp", [0, 4, 2, 1]),
    "list_negative": ("mlp", [-1, 0, -5, 2], [4, 0, 0, 2]),  # Captum 0.9 rejects negative list entries
    "tensor_1d": ("mlp", torch.tensor([4, 3, 0, 1])),
    "tensor_0d": ("mlp", torch.tensor(2)),
    "tensor_int32": ("cnn", torch.tensor([3, 0, 1, 2], dtype=torch.int32)),
    "tuple": ("multi_dim", (2, 3)),
    "tuple_negative": ("multi_dim", (-1, 0)),
    "list_of_tuples": ("multi_dim", [(0, 0), (1, 3), (2, 1), (0, 2)]),
    "none_1d_output": ("single", None),
    "none_keepdim_output": ("single_keepdim", None),
    "zero_keepdim_output": ("single_keepdim", 0),
    "transformer_tensor": ("transformer", torch.tensor([2, 0, 1, 1])),
}


@pytest.mark.parametrize("kind", ALL_METHODS)
@pytest.mark.parametrize("form", list(TARGETS))
def test_target_forms(form, kind):
    name, target, *ref_target = TARGETS[form]
    model, inputs, _, afa = setup(name)
    kw = {"ref_target": ref_target[0]} if ref_target else {}
    check_any(kind, model, inputs, target, afa, method="riemann_middle", n_steps=8, **kw)


# --------------------------------------------------------------------------- baseline forms


def _g(*shape, seed=11):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


BASELINES = {
    "mlp_none": ("mlp", None),
    "mlp_float": ("mlp", 0.5),
    "mlp_int": ("mlp", 1),
    "mlp_negative": ("mlp", -0.25),
    "mlp_sample_shape": ("mlp", _g(12)),
    "mlp_leading_one": ("mlp", _g(1, 12)),
    "mlp_per_sample": ("mlp", _g(B, 12)),
    "cnn_sample_shape": ("cnn", _g(3, 8, 8)),
    "cnn_leading_one": ("cnn", _g(1, 3, 8, 8)),
    "cnn_per_sample": ("cnn", _g(B, 3, 8, 8)),
    "cnn_float": ("cnn", -0.1),
    "transformer_per_sample": ("transformer", _g(B, 5, 8)),
    "transformer_sample_shape": ("transformer", _g(5, 8)),
    "two_none": ("two_input", None),
    "two_one_number": ("two_input", 0.3),
    "two_numbers": ("two_input", (0.3, -1)),
    "two_float_tensor": ("two_input", (0.5, _g(B, 2, 4))),
    "two_sample_float": ("two_input", (_g(6), 0.0)),
    "two_none_leading_one": ("two_input", (None, _g(1, 2, 4))),
    "two_per_sample_int": ("two_input", (_g(B, 6), 1)),
    "two_sample_sample": ("two_input", (_g(6), _g(2, 4, seed=12))),
    "multi_dim_per_sample": ("multi_dim", _g(B, 10)),
    "with_args_sample_shape": ("with_args", _g(10)),
}


@pytest.mark.parametrize("mbi", [True, False], ids=["mult", "nomult"])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("form", list(BASELINES))
def test_baseline_forms(form, method, mbi):
    name, baselines = BASELINES[form]
    model, inputs, target, afa = setup(name)
    check_ig(model, inputs, baselines=baselines, target=target, afa=afa, mbi=mbi, method=method, n_steps=12)


# --------------------------------------------------------------------------- single vs tuple inputs


@pytest.mark.parametrize("kind", ALL_METHODS)
@pytest.mark.parametrize("form", ["tensor", "one_tuple", "two_tuple"])
def test_single_and_tuple_inputs(form, kind):
    if form == "two_tuple":
        model, inputs, target, afa = setup("two_input")
    else:
        model, x, target, afa = setup("mlp")
        inputs = x if form == "tensor" else (x,)
    check_any(kind, model, inputs, target, afa, method="riemann_right", n_steps=6)


def test_list_inputs_act_like_a_tuple():
    model, inputs, target, _ = setup("two_input")
    for method in (fastattr.Saliency(model), fastattr.InputXGradient(model), fastattr.IntegratedGradients(model)):
        from_list = method.attribute(list(inputs), target=target)
        from_tuple = method.attribute(inputs, target=target)
        assert isinstance(from_list, tuple) and len(from_list) == 2
        for a, b in zip(from_list, from_tuple):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_non_contiguous_inputs(layout):
    if layout == "channels_last":
        model, x, target, _ = setup("cnn")
        x = x.contiguous(memory_format=torch.channels_last)
        baselines = _g(B, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    else:
        model, x, target, _ = setup("mlp")
        x = x.t().contiguous().t()  # a (B, 12) view with transposed strides
        baselines = _g(12, B).t()
    assert not x.is_contiguous()
    check_ig(model, x, baselines=baselines, target=target, n_steps=8)
    for kind in GRADIENT_METHODS:
        check_any(kind, model, x, target, None)


def test_tuple_output_shapes_match_inputs():
    model, inputs, target, _ = setup("two_input")
    attrs = fastattr.IntegratedGradients(model).attribute(inputs, target=target, n_steps=4)
    assert isinstance(attrs, tuple) and [a.shape for a in attrs] == [x.shape for x in inputs]


# --------------------------------------------------------------------------- additional_forward_args

AFA = {
    "tensor_and_float": lambda: (make_mask(B), 2.0),
    "tensor_and_int": lambda: (make_mask(B), 3),
    "bare_tensor": lambda: make_mask(B),
    "one_tuple": lambda: (make_mask(B),),
    "small_scale": lambda: (make_mask(B, seed=5), 0.5),
}


@pytest.mark.parametrize("kind", ALL_METHODS)
@pytest.mark.parametrize("form", list(AFA))
def test_additional_forward_args(form, kind):
    model, inputs, target, _ = setup("with_args")
    check_any(kind, model, inputs, target, AFA[form](), method="gausslegendre", n_steps=9)


@pytest.mark.parametrize("kind", ALL_METHODS)
@pytest.mark.parametrize(
    "case",
    ["batch1_tensor_arg", "batch2_tensor_and_int"],
)
def test_additional_forward_args_captum_model4(case, kind):
    """Captum's BasicModel4_MultiArgs cases from its own test suite."""
    model = make("basic4")
    if case == "batch1_tensor_arg":
        inputs = (torch.tensor([[1.5, 2.0, 34.3]]), torch.tensor([[3.0, 3.5, 23.2]]))
        afa = torch.arange(1.0, 4.0).reshape(1, 3)
        target = None
    else:
        inputs = (torch.tensor([[1.5, 2.0, 34.3], [3.4, 1.2, 2.0]]), torch.tensor([[3.0, 3.5, 23.2], [2.3, 1.2, 0.3]]))
        afa = (torch.arange(1.0, 7.0).reshape(2, 3), 1)
        target = None
    if kind in GRADIENT_METHODS:
        check_any(kind, model, inputs, target, afa)
    else:
        check_ig(model, inputs, target=target, afa=afa, mbi=kind == "ig", method="riemann_left", n_steps=20)


# --------------------------------------------------------------------------- internal_batch_size


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_trapezoid"])
@pytest.mark.parametrize("ibs", [None, 1, 7, 1000])
@pytest.mark.parametrize("name", ["mlp", "two_input", "with_args", "multi_dim"])
def test_internal_batch_size(name, ibs, method):
    model, inputs, target, afa = setup(name, batch=5)
    check_ig(model, inputs, target=target, afa=afa, method=method, n_steps=9, ibs=ibs)
    # and equal to fastattr's own unchunked run
    unchunked, d0 = fastattr.IntegratedGradients(model).attribute(
        inputs, target=target, additional_forward_args=afa, n_steps=9, method=method, return_convergence_delta=True
    )
    chunked, d1 = fastattr.IntegratedGradients(model).attribute(
        inputs, target=target, additional_forward_args=afa, n_steps=9, method=method, internal_batch_size=ibs, return_convergence_delta=True
    )
    assert_attr_close(chunked, unchunked)
    torch.testing.assert_close(d1, d0, rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("kind", ["ig", "saliency_signed", "input_x_gradient"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_mixed_precision_close_to_captum_fp32(name, precision, kind):
    model, inputs, target, afa = setup(name)
    if kind == "ig":
        got, delta, ref, ref_delta = ig_pair(model, inputs, target=target, afa=afa, n_steps=16, precision=precision)
        assert torch.isfinite(delta).all()
        # F(x) - F(x0) is evaluated in fp32, so the delta stays of the order of the attribution error
        scale = sum(float(r.abs().sum()) for r in as_tuple(ref)) / B + output_scale(model, inputs, afa)
        assert float((delta - ref_delta).abs().max()) < MIXED_BOUNDS[precision] * scale
    else:
        got, ref = grad_pair(kind, model, inputs, target, afa, precision=precision)
    for g, r in zip(as_tuple(got), as_tuple(ref)):
        assert g.dtype == r.dtype == torch.float32 and g.shape == r.shape
        assert torch.isfinite(g).all()
    err = rel_l2(got, ref)
    assert err < MIXED_BOUNDS[precision], f"{precision} relative L2 error {err:.3g}"


@pytest.mark.parametrize("kind", ["ig", "saliency_abs", "input_x_gradient"])
@pytest.mark.parametrize("name", MODELS)
def test_tf32_on_cpu_equals_fp32(name, kind):
    """TF32 only changes CUDA matmuls: on CPU "tf32" is bit-identical to "fp32" (a fixed row
    budget <= 32 keeps fastattr's CPU row tuning out of the comparison)."""
    model, inputs, target, afa = setup(name)
    if kind == "ig":
        method = fastattr.IntegratedGradients(model)
        kw = dict(target=target, additional_forward_args=afa, n_steps=8, internal_batch_size=16, return_convergence_delta=True)
        a32, d32 = method.attribute(inputs, **kw)
        a_tf, d_tf = method.attribute(inputs, precision="tf32", **kw)
        # tf32 evaluates F(x), F(x0) in a separate forward instead of reusing the pass: rounding only
        torch.testing.assert_close(d_tf, d32, rtol=1e-5, atol=1e-6)
        check_ig(model, inputs, target=target, afa=afa, n_steps=8, precision="tf32")
    else:
        method = fastattr.InputXGradient(model) if kind == "input_x_gradient" else fastattr.Saliency(model)
        a32 = method.attribute(inputs, target=target, additional_forward_args=afa, max_rows=16)
        a_tf = method.attribute(inputs, target=target, additional_forward_args=afa, max_rows=16, precision="tf32")
    for g, r in zip(as_tuple(a_tf), as_tuple(a32)):
        assert torch.equal(g, r)
