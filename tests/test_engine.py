"""The engine: chunking under a row budget, model/global state hygiene, precision policies,
quadrature caching and the fp16 overflow retry."""

from __future__ import annotations

import contextlib
import logging
import threading

import captum.attr as ca
import pytest
import torch
import torch.nn as nn
from models import as_tuple, make, make_inputs, make_mask, rel_l2

import fastattr
from fastattr.budget import parse_bytes
from fastattr.precision import get_precision
from fastattr.quadrature import points_and_weights

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]


@contextlib.contextmanager
def row_recorder(model: nn.Module):
    """Records the number of rows of the first positional input of every forward call."""
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


def _problem(name: str, batch: int):
    model = make(name)
    xs = make_inputs(name, batch)
    inputs = xs if len(xs) > 1 else xs[0]
    afa = (make_mask(batch), 0.5) if name == "with_args" else None
    target = torch.arange(batch) % 3
    return model, inputs, target, afa


# --------------------------------------------------------------------------- chunking invariance

IBS = [1, 2, 5, 11, 12, 13, 50, 143, 1000]


def _unchunked_reference(model, inputs, target, afa, method, n_steps):
    """One forward over all n_steps x batch rows. fastattr's own planner always chunks on CPU
    (it starts small and grows), so the unchunked run is Captum's (same points and weights);
    fastattr's "trapezoid" is Captum's riemann_trapezoid rescaled by n / (n - 1)."""
    captum_method = "riemann_trapezoid" if method == "trapezoid" else method
    ref, ref_delta = ca.IntegratedGradients(model).attribute(
        tuple(x.clone() for x in as_tuple(inputs)) if isinstance(inputs, tuple) else inputs.clone(),
        target=target, additional_forward_args=afa, n_steps=n_steps, method=captum_method, return_convergence_delta=True,
    )
    if method == "trapezoid":
        ref = tuple(r * n_steps / (n_steps - 1) for r in as_tuple(ref))
        ref = ref if isinstance(inputs, tuple) else ref[0]
        ref_delta = None
    return ref, ref_delta


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "trapezoid"])
@pytest.mark.parametrize("name", ["transformer", "with_args", "two_input"])
def test_ig_chunking_invariance(name, method):
    """n_steps=13 on 11 examples (143 rows): every row budget, including ones that split
    steps and examples mid-way, gives the unchunked result to fp32 rounding."""
    model, inputs, target, afa = _problem(name, 11)
    kw = dict(target=target, additional_forward_args=afa, n_steps=13, method=method, return_convergence_delta=True)
    with row_recorder(model) as rows:
        _unchunked_reference(model, inputs, target, afa, method, 13)
    assert max(rows) == 143
    ref, ref_delta = _unchunked_reference(model, inputs, target, afa, method, 13)
    first = None
    for ibs in IBS:
        with row_recorder(model) as rows:
            got, delta = fastattr.IntegratedGradients(model).attribute(inputs, internal_batch_size=ibs, **kw)
        assert max(rows) <= ibs
        for g, r in zip(as_tuple(got), as_tuple(ref)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m, ibs=ibs: f"internal_batch_size={ibs}: {m}")
        if ref_delta is not None:
            torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=1e-6)
        if first is None:
            first = (got, delta)
        else:  # and all budgets agree with each other
            for g, r in zip(as_tuple(got), as_tuple(first[0])):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(delta, first[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_rows", [1, 3, 4, 10, 11, 100])
@pytest.mark.parametrize("cls", [fastattr.Saliency, fastattr.InputXGradient])
def test_gradient_methods_chunking_invariance(cls, max_rows):
    model, inputs, target, afa = _problem("with_args", 11)
    ref = cls(model).attribute(inputs, target=target, additional_forward_args=afa)
    with row_recorder(model) as rows:
        got = cls(model).attribute(inputs, target=target, additional_forward_args=afa, max_rows=max_rows)
    assert max(rows) <= max_rows and sum(rows) == 11
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- row budget


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right", "riemann_trapezoid"])
@pytest.mark.parametrize("budget", [1, 7, 16, 64])
def test_ig_forwards_respect_budget(budget, method, delta):
    model, inputs, target, _ = _problem("cnn", 8)
    n_steps = 20
    with row_recorder(model) as rows:
        fastattr.IntegratedGradients(model).attribute(
            inputs, target=target, n_steps=n_steps, method=method, internal_batch_size=budget, return_convergence_delta=delta
        )
    assert rows and max(rows) <= budget, rows
    assert max(rows) < n_steps * 8  # the full n_steps x batch tensor never reaches the model
    # every (step, example) pair is evaluated once; F(x)/F(x0) add at most 2 * batch rows
    assert n_steps * 8 <= sum(rows) <= n_steps * 8 + (2 * 8 if delta else 0)


@pytest.mark.parametrize("budget", [1, 3, 8])
@pytest.mark.parametrize("cls", [fastattr.Saliency, fastattr.InputXGradient])
def test_gradient_methods_forwards_respect_budget(cls, budget):
    model, inputs, target, _ = _problem("transformer", 8)
    with row_recorder(model) as rows:
        cls(model).attribute(inputs, target=target, max_rows=budget)
    assert max(rows) <= budget and sum(rows) == 8


def test_two_input_forward_gets_matching_rows():
    seen = []

    class Check(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make("two_input")

        def forward(self, x1, x2, mask):
            seen.append((x1.shape[0], x2.shape[0], mask.shape[0]))
            return self.inner(x1 * mask[:, :6], x2)

    model = Check().eval()
    x1, x2 = make_inputs("two_input", 5)
    mask = make_mask(5)
    fastattr.IntegratedGradients(model).attribute((x1, x2), target=1, additional_forward_args=(mask,), n_steps=7, internal_batch_size=4)
    assert seen and all(a == b == c <= 4 for a, b, c in seen)


# --------------------------------------------------------------------------- model/global state hygiene


def _state(model: nn.Module):
    return (
        model.training,
        [(n, p.requires_grad, p.dtype, p.grad) for n, p in model.named_parameters()],
        {n: p.detach().clone() for n, p in model.named_parameters()},
        [(n, m.training) for n, m in model.named_modules()],
    )


def _assert_same_state(before, after):
    assert before[0] == after[0]
    assert before[1] == after[1]
    assert before[3] == after[3]
    for n, v in before[2].items():
        assert torch.equal(v, after[2][n]), n


def _calls(model, x):
    return [
        lambda: fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=5, return_convergence_delta=True),
        lambda: fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=5, precision="fp16"),
        lambda: fastattr.Saliency(model).attribute(x, target=1, max_rows=2),
        lambda: fastattr.InputXGradient(model).attribute(x, target=1, precision="bf16"),
    ]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("call", range(4))
def test_model_not_modified(call, training):
    model = make("mlp")
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    model.train(training)
    model.net[0].train(not training)  # a mixed-mode submodule too
    x = make_inputs("mlp", 4)[0]
    x_before = x.clone()
    before = _state(model)
    _calls(model, x)[call]()
    _assert_same_state(before, _state(model))
    assert torch.equal(x, x_before) and not x.requires_grad


@pytest.mark.parametrize("call", range(4))
def test_model_not_modified_after_error(call):
    model = make("mlp")
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    before = _state(model)
    x = make_inputs("mlp", 4)[0]
    bad = [
        lambda: fastattr.IntegratedGradients(model).attribute(x, target=9, n_steps=5, return_convergence_delta=True),
        lambda: fastattr.IntegratedGradients(model).attribute(x, target=[0, 1, 2, 5], n_steps=5, internal_batch_size=3),
        lambda: fastattr.Saliency(model).attribute(x, target=-6),
        lambda: fastattr.InputXGradient(model).attribute(x, target=None),
    ][call]
    with pytest.raises(fastattr.AttributionInputError):
        bad()
    _assert_same_state(before, _state(model))


def test_model_not_modified_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom in forward")
            return self.fc(x)

    model = Boom().train()
    model.fc.bias.requires_grad_(False)
    before = _state(model)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with pytest.raises(RuntimeError, match="boom in forward"):
        fastattr.IntegratedGradients(model).attribute(torch.randn(3, 4), target=0, n_steps=4, internal_batch_size=3, precision="tf32")
    _assert_same_state(before, _state(model))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_concurrent_calls_leave_requires_grad_intact():
    a_in_forward, b_in_forward, a_done = threading.Event(), threading.Event(), threading.Event()

    class Gate(nn.Module):
        """Orders two threads: A enters, B enters (while A holds the model frozen), A exits, B exits."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            name = threading.current_thread().name
            if name == "A":
                a_in_forward.set()
                b_in_forward.wait(5)
            elif name == "B":
                b_in_forward.set()
                a_done.wait(5)
            return self.fc(x)

    model = Gate()
    x = torch.randn(2, 4)

    def run_a():
        try:
            fastattr.Saliency(model).attribute(x, target=0)
        finally:
            a_done.set()

    def run_b():
        a_in_forward.wait(5)
        fastattr.Saliency(model).attribute(x, target=0)

    threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [p.requires_grad for p in model.parameters()] == [True, True]


def test_float64_model_keeps_dtype():
    model = make("mlp").double()
    x = make_inputs("mlp", 3, dtype=torch.float64)[0]
    attr, delta = fastattr.IntegratedGradients(model).attribute(x, target=0, n_steps=6, return_convergence_delta=True)
    assert attr.dtype == delta.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("mode", ["no_grad", "enable_grad", "set_grad_enabled_false"])
def test_works_under_grad_modes(mode):
    model, inputs, target, _ = _problem("transformer", 4)
    ref_ig, ref_d = fastattr.IntegratedGradients(model).attribute(inputs, target=target, n_steps=6, return_convergence_delta=True)
    ref_sal = fastattr.Saliency(model).attribute(inputs, target=target)
    ctx = {"no_grad": torch.no_grad, "enable_grad": torch.enable_grad, "set_grad_enabled_false": lambda: torch.set_grad_enabled(False)}[mode]()  # built lazily: set_grad_enabled(False) acts at construction
    with ctx:
        grad_mode = torch.is_grad_enabled()
        got_ig, got_d = fastattr.IntegratedGradients(model).attribute(inputs, target=target, n_steps=6, return_convergence_delta=True)
        got_sal = fastattr.Saliency(model).attribute(inputs, target=target)
        got_ixg = fastattr.InputXGradient(model).attribute(inputs, target=target)
        assert torch.is_grad_enabled() == grad_mode
    torch.testing.assert_close(got_ig, ref_ig, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_d, ref_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_sal, ref_sal, rtol=1e-5, atol=1e-6)
    assert not got_ig.requires_grad and not got_sal.requires_grad and not got_ixg.requires_grad


def test_inputs_requiring_grad_are_accepted_and_untouched():
    model, x, target, _ = _problem("mlp", 4)
    leaf = x.clone().requires_grad_(True)
    attr = fastattr.IntegratedGradients(model).attribute(leaf, target=target, n_steps=5)
    ref = fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=5)
    assert leaf.requires_grad and leaf.grad is None and not attr.requires_grad
    torch.testing.assert_close(attr, ref, rtol=1e-5, atol=1e-6)


def test_bound_method_forward_func_freezes_and_restores():
    model = make("mlp")
    model.net[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    got = fastattr.IntegratedGradients(model.forward).attribute(make_inputs("mlp", 3)[0], target=2, n_steps=4)
    assert torch.isfinite(got).all()
    assert [p.requires_grad for p in model.parameters()] == flags


def test_plain_function_forward_func():
    model = make("mlp")
    got = fastattr.IntegratedGradients(lambda x: model(x) * 2).attribute(make_inputs("mlp", 3)[0], target=2, n_steps=4)
    ref = fastattr.IntegratedGradients(model).attribute(make_inputs("mlp", 3)[0], target=2, n_steps=4)
    torch.testing.assert_close(got, 2 * ref)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- precision policies


@pytest.mark.parametrize("initial", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("precision", fastattr.PRECISIONS)
def test_precision_restores_tf32_flags(precision, initial):
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.requires_grad:  # the gradient pass, under the policy
                seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled("cpu")))
            return self.fc(x)

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = initial
        torch.manual_seed(0)
        model = Probe().eval()
        fastattr.IntegratedGradients(model).attribute(torch.randn(3, 4), target=0, n_steps=3, precision=precision, return_convergence_delta=True)
        fastattr.Saliency(model).attribute(torch.randn(3, 4), target=0, precision=precision)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == initial
        policy = get_precision(precision)
        assert seen and all(s == (policy.allow_tf32, policy.allow_tf32, policy.autocast_dtype is not None) for s in seen)
        assert not torch.is_autocast_enabled("cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_precision_objects():
    assert fastattr.PRECISIONS == ("fp32", "tf32", "bf16", "fp16")
    assert get_precision("bf16").autocast_dtype == torch.bfloat16
    assert get_precision("fp16").scaled and not get_precision("fp32").scaled
    p = get_precision("fp16")
    assert get_precision(p) is p
    with pytest.raises(ValueError, match="precision must be one of"):
        get_precision("fp64")


# --------------------------------------------------------------------------- quadrature cache


@pytest.mark.parametrize("method", fastattr.RULES)
def test_quadrature_cached(method):
    first = points_and_weights(method, 17)
    second = points_and_weights(method, 17)
    assert first is second
    assert isinstance(first[0], tuple) and isinstance(first[1], tuple)  # immutable: safe to share
    assert points_and_weights(method, 18) is not first


def test_quadrature_matches_captum():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for method in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        for n in (2, 5, 50):
            step_sizes, alphas = approximation_parameters(method)
            got_alphas, got_weights = points_and_weights(method, n)
            assert list(got_alphas) == list(alphas(n))
            assert list(got_weights) == pytest.approx(list(step_sizes(n)), rel=1e-15, abs=0)


# --------------------------------------------------------------------------- fp16 overflow retry


class LargeGrad(nn.Module):
    """Moderate outputs but gradients of order 1e4: the scaled fp16 backward overflows."""

    def __init__(self, out_scale: float = 1e4):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)
        self.out_scale = out_scale

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x))) * self.out_scale


def test_fp16_overflow_retry(caplog):
    model = LargeGrad().eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    ref = fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=8)
    with caplog.at_level(logging.DEBUG, logger="fastattr.engine"):
        got, delta = fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=8, precision="fp16", return_convergence_delta=True)
    assert any("retrying chunk" in r.getMessage() for r in caplog.records)  # the retry path really ran
    assert torch.isfinite(got).all() and torch.isfinite(delta).all()
    assert rel_l2(got, ref) < 1e-2
    sal = fastattr.Saliency(model).attribute(x, target=1, precision="fp16", max_rows=2)
    assert torch.isfinite(sal).all()
    assert rel_l2(sal, fastattr.Saliency(model).attribute(x, target=1)) < 1e-2


def test_fp16_small_gradients_do_not_underflow():
    model = LargeGrad(out_scale=1e-5).eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    ref = fastattr.Saliency(model).attribute(x, target=0, abs=False)
    got = fastattr.Saliency(model).attribute(x, target=0, abs=False, precision="fp16")
    assert float(ref.abs().max()) < 1e-5
    assert rel_l2(got, ref) < 1e-2


def test_fp16_forward_overflow_raises():
    model = LargeGrad(out_scale=1e9).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(FloatingPointError, match="overflowed in fp16"):
        fastattr.IntegratedGradients(model).attribute(x, target=0, n_steps=4, precision="fp16")


# --------------------------------------------------------------------------- misc engine options


def test_parse_bytes():
    assert parse_bytes(None) is None
    assert parse_bytes(123) == 123
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1e9") == 10**9
    assert parse_bytes("2 kib") == 2048
    with pytest.raises(ValueError, match="cannot parse memory size"):
        parse_bytes("lots")


def test_memory_budget_accepted_on_cpu():
    model, x, target, _ = _problem("mlp", 4)
    ref = fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=6)
    got = fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=6, memory_budget="1GiB")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot parse memory size"):
        fastattr.Saliency(model).attribute(x, target=target, memory_budget="plenty")


def test_kernel_backend_torch_matches_default():
    model, x, target, _ = _problem("mlp", 4)
    ref, d = fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=6, return_convergence_delta=True)
    got, d2 = fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=6, return_convergence_delta=True, kernel_backend="torch")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d2, d, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel backend"):
        fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=6, kernel_backend="cuda")


def test_has_convergence_delta_and_multiplies_by_inputs():
    model = make("mlp")
    assert fastattr.IntegratedGradients(model).has_convergence_delta()
    assert not fastattr.Saliency(model).has_convergence_delta()
    assert fastattr.IntegratedGradients(model, multiply_by_inputs=False).multiplies_by_inputs is False
    assert fastattr.InputXGradient(model).multiplies_by_inputs is True
    with pytest.raises(TypeError, match="forward_func must be"):
        fastattr.Saliency("not a model")


def test_target_tensor_of_index_tuples_equals_list_of_tuples():
    """fastattr extension: a (B, k) integer tensor is the list-of-tuples form, kept on the device."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Unflatten(1, (3, 4))).eval()
    x = torch.randn(5, 6)
    rows = [(i % 3, (2 * i) % 4) for i in range(5)]
    a = fastattr.IntegratedGradients(model).attribute(x, target=torch.tensor(rows), n_steps=8)
    b = fastattr.IntegratedGradients(model).attribute(x, target=rows, n_steps=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_autograd_grad_per_chunk_and_no_unbind(monkeypatch):
    """The engine's contract: ONE torch.autograd.grad per chunk, on the selected outputs
    (never Captum's torch.unbind into per-row roots), and one forward per chunk."""
    model, inputs, target, _ = _problem("mlp", 7)
    grads, forwards = [], []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        grads.append(outputs.shape if isinstance(outputs, torch.Tensor) else len(outputs))
        return real_grad(outputs, inputs, *args, **kwargs)

    def no_unbind(*args, **kwargs):
        raise AssertionError("torch.unbind was called")

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch, "unbind", no_unbind)
    handle = model.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
    fastattr.IntegratedGradients(model).attribute(inputs, target=target, n_steps=9, internal_batch_size=10)
    handle.remove()
    assert len(grads) == len(forwards) == -(-7 * 9 // 10)  # ceil(63 / 10) chunks
    assert all(isinstance(s, torch.Size) and len(s) == 1 for s in grads)  # one (rows,) root per chunk
