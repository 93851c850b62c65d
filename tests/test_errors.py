"""Bad input raises the documented error, with a message naming the problem, and as early as
possible: shape / NaN / baseline / target-form errors before any forward, target-range
errors after at most the first forward and before any backward."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from models import make, make_inputs

import fastattr
from fastattr import AttributionInputError, NoGradientError

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]

B = 4


class Counting(nn.Module):
    """Wraps a model; counts forward calls and backward passes through its output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.forwards = 0
        self.backwards = 0

    def _count_backward(self, grad):
        self.backwards += 1
        return grad

    def forward(self, *args):
        self.forwards += 1
        out = self.inner(*args)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._count_backward)
        return out


def counting(name: str) -> Counting:
    return Counting(make(name)).eval()


def _x(name="mlp", batch=B, **kw):
    xs = make_inputs(name, batch, **kw)
    return xs if len(xs) > 1 else xs[0]


def test_error_types():
    assert issubclass(AttributionInputError, ValueError)
    assert issubclass(NoGradientError, RuntimeError)


def _methods(model, path_only=False):
    """(name, attribute callable) for each method; IG twice (with and without delta)."""
    out = [
        ("ig", lambda inputs, **kw: fastattr.IntegratedGradients(model).attribute(inputs, n_steps=4, **kw)),
        ("ig_delta", lambda inputs, **kw: fastattr.IntegratedGradients(model).attribute(inputs, n_steps=4, return_convergence_delta=True, **kw)),
    ]
    if not path_only:
        out += [
            ("saliency", lambda inputs, **kw: fastattr.Saliency(model).attribute(inputs, **kw)),
            ("input_x_gradient", lambda inputs, **kw: fastattr.InputXGradient(model).attribute(inputs, **kw)),
        ]
    return out


METHOD_NAMES = ["ig", "ig_delta", "saliency", "input_x_gradient"]


def _method(model, name):
    return dict(_methods(model))[name]


# --------------------------------------------------------------------------- baselines (IG)

BASELINE_ERRORS = {
    "wrong_features": ("mlp", torch.zeros(B, 11), "baseline 0 has shape (4, 11)"),
    "wrong_batch": ("mlp", torch.zeros(3, 12), "baseline 0 has shape (3, 12)"),
    "wrong_sample_shape": ("mlp", torch.zeros(13), "baseline 0 has shape (13,)"),
    "too_many_dims": ("mlp", torch.zeros(1, B, 12), "baseline 0 has shape (1, 4, 12)"),
    "cnn_transposed": ("cnn", torch.zeros(8, 8, 3), "baseline 0 has shape (8, 8, 3)"),
    "second_input_shape": ("two_input", (0.0, torch.zeros(B, 4, 2)), "baseline 1 has shape (4, 4, 2)"),
    "count_one_for_two": ("two_input", (0.0,), "got 1 baselines for 2 inputs"),
    "count_three_for_two": ("two_input", (0.0, 0.0, 0.0), "got 3 baselines for 2 inputs"),
    "tensor_for_two_inputs": ("two_input", torch.zeros(6), "got 1 baselines for 2 inputs"),
    "string": ("mlp", "zeros", "baselines must be None, a number, a tensor"),
    "bool": ("mlp", True, "baseline 0 must be None, a number or a tensor"),
    "nan_number": ("mlp", float("nan"), "baseline 0 is nan"),
    "inf_number": ("mlp", float("-inf"), "baseline 0 is -inf"),
    "nan_tensor": ("mlp", torch.full((12,), float("nan")), "baseline 0 contains NaN or inf"),
    "inf_in_per_sample_tensor": ("cnn", torch.zeros(B, 3, 8, 8).index_fill_(0, torch.tensor([2]), float("inf")), "baseline 0 contains NaN or inf"),
    "nan_second_input": ("two_input", (0.0, torch.full((2, 4), float("nan"))), "baseline 1 contains NaN or inf"),
}


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("case", list(BASELINE_ERRORS))
def test_baseline_errors_before_any_forward(case, delta):
    name, baselines, message = BASELINE_ERRORS[case]
    model = counting(name)
    with pytest.raises(AttributionInputError, match=re.escape(message)):
        fastattr.IntegratedGradients(model).attribute(_x(name), baselines=baselines, target=0, n_steps=4, return_convergence_delta=delta)
    assert model.forwards == 0


@pytest.mark.parametrize("case", ["nan_number", "inf_number", "nan_tensor", "nan_second_input"])
def test_nonfinite_baselines_allowed(case):
    name, baselines, _ = BASELINE_ERRORS[case]
    model = counting(name)
    attr, delta = fastattr.IntegratedGradients(model).attribute(
        _x(name), baselines=baselines, target=0, n_steps=4, allow_nonfinite=True, return_convergence_delta=True
    )
    assert model.forwards > 0
    assert not torch.isfinite(delta).all()  # a non-finite attribution row reports a NaN delta


# --------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_nonfinite_inputs_rejected_before_forward(method, value):
    model = counting("mlp")
    x = _x()
    x[1, 3] = value
    with pytest.raises(AttributionInputError, match=re.escape("input 0 contains NaN or inf values (pass allow_nonfinite=True")):
        _method(model, method)(x, target=0)
    assert model.forwards == 0


def test_nonfinite_second_input_named():
    model = counting("two_input")
    x1, x2 = _x("two_input")
    x2[0, 1, 1] = float("nan")
    with pytest.raises(AttributionInputError, match="input 1 contains NaN or inf"):
        fastattr.Saliency(model).attribute((x1, x2), target=0)
    assert model.forwards == 0


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_nonfinite_inputs_allowed(method):
    model = make("multi_dim")  # tanh: NaN propagates into the gradient (ReLU's backward would zero it)
    x = _x("multi_dim")
    clean = _method(model, method)(x, target=(0, 1))
    x[1, 3] = float("nan")
    out = _method(model, method)(x, target=(0, 1), allow_nonfinite=True)
    attr, delta = out if method == "ig_delta" else (out, None)
    if method == "ig_delta":
        attr_clean, delta_clean = clean
        assert torch.isnan(delta[1]) and torch.isfinite(delta[[0, 2, 3]]).all()
        torch.testing.assert_close(delta[[0, 2, 3]], delta_clean[[0, 2, 3]], rtol=1e-5, atol=1e-6)
    else:
        attr_clean = clean
    # examples do not interact: only example 1 is non-finite
    assert not torch.isfinite(attr[1]).all()
    torch.testing.assert_close(attr[[0, 2, 3]], attr_clean[[0, 2, 3]], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize(
    "method,dtype",
    [(m, d) for m in METHOD_NAMES for d in (torch.int64, torch.int32, torch.uint8, torch.bool) if d == torch.bool or not m.startswith("ig")],
)
def test_non_floating_inputs_type_error(method, dtype):
    """Gradients at integer inputs are an error; IG interpolates them into floats as Captum does
    (tests/test_dropin_adversarial.py), but not bool inputs (Captum's x - x0 fails on them too)."""
    model = counting("mlp")
    x = (_x() * 3).to(dtype)
    with pytest.raises(TypeError, match=re.escape(f"input 0 has dtype {dtype}")):
        _method(model, method)(x, target=0)
    assert model.forwards == 0


def test_non_floating_second_input_type_error():
    model = counting("two_input")
    x1, x2 = _x("two_input")
    with pytest.raises(TypeError, match="input 1 has dtype torch.int64"):
        fastattr.Saliency(model).attribute((x1, x2.long()), target=0)
    assert model.forwards == 0


SHAPE_ERRORS = {
    "batch_mismatch": (lambda: (_x("two_input")[0], _x("two_input", 3)[1]), "all inputs must share the batch size; got [(4, 6), (3, 2, 4)]"),
    "empty_batch": (lambda: _x()[:0], "inputs are empty (batch size 0)"),
    "empty_tuple_batch": (lambda: tuple(t[:0] for t in _x("two_input")), "inputs are empty (batch size 0)"),
    "scalar_input": (lambda: torch.tensor(1.0), "input 0 is a scalar"),
    "empty_tuple": (lambda: (), "inputs must be a tensor or a non-empty tuple of tensors"),
    "not_a_tensor": (lambda: [[1.0, 2.0]], "inputs must be a tensor or a non-empty tuple of tensors"),
    "numpy_like": (lambda: _x().numpy(), "inputs must be a tensor or a non-empty tuple of tensors, got ndarray"),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("case", list(SHAPE_ERRORS))
def test_input_shape_errors_before_any_forward(case, method):
    make_bad, message = SHAPE_ERRORS[case]
    model = counting("two_input" if "tuple" in case or "batch_mismatch" in case else "mlp")
    with pytest.raises(AttributionInputError, match=re.escape(message)):
        _method(model, method)(make_bad(), target=0)
    assert model.forwards == 0


# --------------------------------------------------------------------------- targets

TARGET_FORM_ERRORS = {
    "list_too_short": ([0, 1, 2], "target list has 3 entries for 4 examples"),
    "list_too_long": ([0, 1, 2, 3, 4], "target list has 5 entries for 4 examples"),
    "float_tensor": (torch.tensor([0.0, 1.0, 2.0, 3.0]), "target tensor must hold integers, got dtype torch.float32"),
    "bool_tensor": (torch.tensor([True, False, True, False]), "target tensor must hold integers, got dtype torch.bool"),
    "tensor_wrong_length": (torch.tensor([0, 1, 2]), "target tensor must be 1-D with one entry per example (4), or (B, k) index tuples; got shape (3,)"),
    "tensor_2d_wrong_rows": (torch.zeros(B + 1, 1, dtype=torch.long), "got shape (5, 1)"),
    "tensor_3d": (torch.zeros(B, 1, 1, dtype=torch.long), "got shape (4, 1, 1)"),
    "float": (1.0, "target must be None, an int, a tuple of ints"),
    "bool": (True, "got bool"),
    "string": ("cat", "got str"),
    "list_of_floats": ([0.0, 1.0, 2.0, 3.0], "a target list must hold ints, or tuples of ints"),
    "mixed_list": ([0, (1, 2), 2, 3], "a target list must hold ints, or tuples of ints"),
    "ragged_tuples": ([(0, 1), (1, 2, 0), (0, 0), (1, 1)], "target tuples in a list must all have the same length"),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("case", list(TARGET_FORM_ERRORS))
def test_target_form_errors_before_any_forward(case, method):
    target, message = TARGET_FORM_ERRORS[case]
    model = counting("mlp")
    with pytest.raises(AttributionInputError, match=re.escape(message)):
        _method(model, method)(_x(), target=target)
    assert model.forwards == 0


TARGET_RANGE_ERRORS = {
    "int_too_large": ("mlp", 5, "target [5] (example 0) is out of range for model output shape (5,)"),
    "int_far_too_large": ("mlp", 1000, "target [1000] (example 0) is out of range"),
    "negative_beyond": ("mlp", -6, "target [-6] (example 0) is out of range for model output shape (5,)"),
    "list_element": ("mlp", [0, 1, 7, 2], "target [7] (example 2) is out of range"),
    "list_negative_element": ("mlp", [0, 1, 2, -9], "target [-9] (example 3) is out of range"),
    "tensor_element": ("cnn", torch.tensor([0, 4, 1, 1]), "target [4] (example 1) is out of range for model output shape (4,)"),
    "tuple_on_2d_output": ("mlp", (1, 2), "target indexes 2 output dimension(s) but the model output per example has shape (5,)"),
    "tuple_too_short": ("multi_dim", (1,), "target indexes 1 output dimension(s) but the model output per example has shape (3, 4)"),
    "int_on_3d_output": ("multi_dim", 1, "target indexes 1 output dimension(s) but the model output per example has shape (3, 4)"),
    "tuple_too_long": ("multi_dim", (1, 2, 0), "target indexes 3 output dimension(s)"),
    "tuple_out_of_range": ("multi_dim", (3, 0), "target [3, 0] (example 0) is out of range for model output shape (3, 4)"),
    "list_of_tuples_out_of_range": ("multi_dim", [(0, 0), (1, 1), (2, 4), (0, 0)], "target [2, 4] (example 2) is out of range"),
    "none_multiclass": ("mlp", None, "pass target= to select one output per example"),
    "none_multi_dim": ("multi_dim", None, "pass target= to select one output per example"),
    "int_on_1d_output": ("single", 0, "target indexes 1 output dimension(s) but the model output per example has shape ()"),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("case", list(TARGET_RANGE_ERRORS))
def test_target_range_errors_before_any_backward(case, method):
    name, target, message = TARGET_RANGE_ERRORS[case]
    model = counting(name)
    with pytest.raises(AttributionInputError, match=re.escape(message)):
        _method(model, method)(_x(name), target=target)
    assert model.forwards <= 1
    assert model.backwards == 0


def test_target_range_error_with_small_budget():
    model = counting("mlp")
    with pytest.raises(AttributionInputError, match="out of range"):
        fastattr.IntegratedGradients(model).attribute(_x(), target=[0, 1, 2, 5], n_steps=6, internal_batch_size=2)
    assert model.forwards == 1 and model.backwards == 0


# --------------------------------------------------------------------------- no gradient


NO_GRAD_MODELS = {
    "second_input_unused": ("two_input_first_only", "does not depend on input(s) [1]"),
    "constant": ("constant", "does not depend on any input"),
    "detaching": ("detaching", "does not depend on any input"),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("case", list(NO_GRAD_MODELS))
def test_no_gradient(case, method):
    name, message = NO_GRAD_MODELS[case]
    model = make(name)
    x = _x("two_input") if name.startswith("two_input") else _x()[:, : 4 if name == "detaching" else 12]
    with pytest.raises(NoGradientError, match=re.escape(message)):
        _method(model, method)(x, target=0)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_no_gradient_plain_function(method):
    """Not an nn.Module (parameters are not frozen): a constant and a detaching function."""
    lin = make("detaching").fc
    for fn in (lambda x: torch.ones(x.shape[0], 3), lambda x: lin(x.detach())):
        with pytest.raises(NoGradientError):
            _method(fn, method)(_x()[:, :4], target=0)


# --------------------------------------------------------------------------- options


OPTION_ERRORS = {
    "unknown_method": (dict(method="simpson"), "unknown integration method 'simpson'"),
    "unknown_precision": (dict(precision="fp8"), "precision must be one of fp32, tf32, bf16, fp16, got 'fp8'"),
    "n_steps_0": (dict(n_steps=0), "n_steps must be a positive int, got 0"),
    "n_steps_negative": (dict(n_steps=-3), "n_steps must be a positive int, got -3"),
    "n_steps_float": (dict(n_steps=2.5), "n_steps must be a positive int, got 2.5"),
    "n_steps_1_riemann_left": (dict(n_steps=1, method="riemann_left"), "method 'riemann_left' needs n_steps >= 2, got 1"),
    "n_steps_1_riemann_right": (dict(n_steps=1, method="riemann_right"), "needs n_steps >= 2"),
    "n_steps_1_riemann_middle": (dict(n_steps=1, method="riemann_middle"), "needs n_steps >= 2"),
    "n_steps_1_riemann_trapezoid": (dict(n_steps=1, method="riemann_trapezoid"), "needs n_steps >= 2"),
    "n_steps_1_trapezoid": (dict(n_steps=1, method="trapezoid"), "method 'trapezoid' needs n_steps >= 2"),
    "internal_batch_size_0": (dict(internal_batch_size=0), "internal_batch_size must be a positive int, got 0"),
    "internal_batch_size_float": (dict(internal_batch_size=4.0), "must be a positive int, got 4.0"),
    "memory_budget_garbage": (dict(memory_budget="a lot"), "cannot parse memory size"),
}


@pytest.mark.parametrize("case", list(OPTION_ERRORS))
def test_ig_option_errors_before_any_forward(case):
    kw, message = OPTION_ERRORS[case]
    model = counting("mlp")
    with pytest.raises(ValueError, match=re.escape(message)):
        fastattr.IntegratedGradients(model).attribute(_x(), target=0, **kw)
    assert model.forwards == 0


@pytest.mark.parametrize("cls", [fastattr.Saliency, fastattr.InputXGradient])
@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(precision="half"), "precision must be one of"),
        (dict(max_rows=0), "must be a positive int, got 0"),
        (dict(max_rows=-1), "must be a positive int, got -1"),
    ],
)
def test_gradient_method_option_errors_before_any_forward(cls, kw, message):
    model = counting("mlp")
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(model).attribute(_x(), target=0, **kw)
    assert model.forwards == 0


def test_n_steps_1_gausslegendre_is_fine():
    attr, delta = fastattr.IntegratedGradients(make("mlp")).attribute(_x(), target=0, n_steps=1, return_convergence_delta=True)
    assert torch.isfinite(attr).all() and torch.isfinite(delta).all()


# --------------------------------------------------------------------------- bad model outputs


class ReturnsTuple(nn.Module):
    def forward(self, x):
        return (x.sum(1), x.sum(1))


class ReducesBatch(nn.Module):
    def forward(self, x):
        return x.sum(0, keepdim=True)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_model_output_errors(method):
    with pytest.raises(AttributionInputError, match="the model must return a tensor, got tuple"):
        _method(ReturnsTuple(), method)(_x(), target=None)
    with pytest.raises(AttributionInputError, match="its first dimension must be the batch"):
        _method(ReducesBatch(), method)(_x(), target=0)
