"""Adversarial drop-in cases: what a Captum 0.9 user writes, where fastattr failed or differed.

Each test names the Captum behaviour it pins; models are tiny (float64 where values are compared
tightly), so the module runs in a few seconds.
"""

from __future__ import annotations

import warnings

import captum.attr as ca
import numpy as np
import pytest
import torch
from torch import nn

import fastattr

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")]


class ConvBnInplaceRelu(nn.Module):
    """conv -> bn -> ReLU(inplace=True): torchvision's ResNet stem and blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("to_input", [False, True])
def test_layer_gradient_x_activation_before_an_inplace_relu(to_input):
    """The layer's value feeds ReLU(inplace=True): Captum hands the model a copy and attributes the
    pre-ReLU activation; fastattr raised 'a leaf Variable that requires grad is being used in an
    in-place operation'."""
    model = ConvBnInplaceRelu().eval()
    layer = model.relu if to_input else model.bn
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = fastattr.LayerGradientXActivation(model, layer).attribute(x, target=1, attribute_to_layer_input=to_input)
    ref = ca.LayerGradientXActivation(model, layer).attribute(x, target=1, attribute_to_layer_input=to_input)
    assert bool((ref < 0).any())  # the pre-ReLU values, negative ones included
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


class Tanh3(nn.Module):
    def __init__(self, features: int = 5, out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(features, out, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def test_gradient_shap_number_baseline():
    """GradientShap's docstring (and _copies.reference_rows) take a number as a constant baseline;
    without a seed it crashed in numpy ('a must be 1-dimensional or an integer'). A constant 0.0 is
    Captum's GradientShap over the one-row reference set zeros(1, F), less Captum's index draw."""
    model = Tanh3()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    np.random.seed(0)
    ref, ref_delta = ca.GradientShap(model).attribute(
        x, torch.zeros(1, 5, dtype=torch.float64), n_samples=3, stdevs=0.1, target=1, return_convergence_delta=True
    )
    torch.manual_seed(0)
    np.random.seed(0)
    np.random.choice(1, 12)  # the index draw Captum makes for its one-row reference set
    got, delta = fastattr.GradientShap(model).attribute(x, 0.0, n_samples=3, stdevs=0.1, target=1, return_convergence_delta=True)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-7, atol=1e-9)
    # the seeded path took numbers already; the same constant in both forms gives the same draws
    gs = fastattr.GradientShap(model)
    torch.testing.assert_close(gs.attribute(x, 0.0, target=1, seed=7), gs.attribute(x, torch.zeros(1, 5, dtype=torch.float64), target=1, seed=7))


@pytest.mark.parametrize("nt_samples_batch_size", [None, 2])
def test_noise_tunnel_over_gradient_shap_returns_every_draws_delta(nt_samples_batch_size):
    """Captum's NoiseTunnel(GradientShap) delta has one entry per (example, copy, GradientShap draw):
    B * nt_samples * n_samples, ordered partition by partition, example-major. fastattr returned
    B * nt_samples (each copy's mean over its draws). With stdevs=0 and a one-row reference set
    the draws differ only in alpha, so the deltas are checked against each copy's own F values."""
    model = Tanh3()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    refs = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = dict(nt_samples=3, nt_samples_batch_size=nt_samples_batch_size, stdevs=0.2, baselines=refs, draw_baseline_from_distrib=True, target=2)
    torch.manual_seed(0)
    np.random.seed(0)
    _, ref_delta = ca.NoiseTunnel(ca.GradientShap(model)).attribute(x, **kw, return_convergence_delta=True)
    torch.manual_seed(0)
    np.random.seed(0)
    nt = fastattr.NoiseTunnel(fastattr.GradientShap(model))
    _, delta = nt.attribute(x, **kw, return_convergence_delta=True)
    assert delta.shape == ref_delta.shape == (4 * 3 * 5,)
    # the mean of each (example, copy)'s draws is the batched result's per-copy delta
    res = nt.attribute_batch(x, **kw, seed=3)
    full = nt.attribute(x, **kw, seed=3, return_convergence_delta=True)[1]
    assert full.shape == (60,)
    k = [3] if nt_samples_batch_size is None else [2, 1]
    means, start = [], 0
    for size in k:  # partitions: (B, size, n) example-major
        part = full[start : start + 4 * size * 5].reshape(4, size, 5)
        means.append(part.mean(2))
        start += 4 * size * 5
    torch.testing.assert_close(torch.cat(means, 1).mean(1), res.delta, rtol=1e-9, atol=1e-12)


def _seeded_call(fn):
    torch.manual_seed(0)
    np.random.seed(0)
    return fn()


@pytest.mark.parametrize(
    "case",
    ["ig", "ig_float_baseline", "ig_uint8", "gradient_shap", "nt_saliency", "nt_ig", "nt_input_x_gradient"],
)
def test_integer_inputs_are_interpolated_as_captum_does(case):
    """Captum's x0 + alpha (x - x0) and x + noise turn integer inputs (pixels stored as uint8,
    counts, 0/1 features) into default-dtype floats, so IntegratedGradients, GradientShap and
    NoiseTunnel work on them; fastattr raised TypeError ('needs floating point')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh())
    x = torch.randint(0, 4, (4, 5), generator=torch.Generator().manual_seed(1))
    calls = {
        "ig": lambda m: m.IntegratedGradients(model).attribute(x, target=1, n_steps=8),
        "ig_float_baseline": lambda m: m.IntegratedGradients(model).attribute(x, baselines=0.5, target=[0, 1, 2, 1], n_steps=8),
        "ig_uint8": lambda m: m.IntegratedGradients(model).attribute(x.to(torch.uint8), target=1, n_steps=8),
        "gradient_shap": lambda m: m.GradientShap(model).attribute(x, torch.zeros(2, 5, dtype=torch.long), n_samples=3, target=1),
        "nt_saliency": lambda m: m.NoiseTunnel(m.Saliency(model)).attribute(x, nt_samples=3, stdevs=0.5, target=1),
        "nt_ig": lambda m: m.NoiseTunnel(m.IntegratedGradients(model)).attribute(x, nt_samples=2, stdevs=0.5, target=1, n_steps=4),
        "nt_input_x_gradient": lambda m: m.NoiseTunnel(m.InputXGradient(model)).attribute(x, nt_samples=3, stdevs=0.5, target=1),
    }
    ref = _seeded_call(lambda: calls[case](ca))
    got = _seeded_call(lambda: calls[case](fastattr))
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_delta_on_integer_inputs():
    """Where Captum's delta fails (it runs the model on the integer inputs), fastattr's is the
    promoted inputs' completeness residual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh())
    x = torch.randint(0, 4, (4, 5), generator=torch.Generator().manual_seed(1))
    attr, delta = fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=64, return_convergence_delta=True)
    _, ref_delta = fastattr.IntegratedGradients(model).attribute(x.float(), target=1, n_steps=64, return_convergence_delta=True)
    torch.testing.assert_close(delta, ref_delta)
    assert float(delta.abs().max()) < 1e-4


def test_train_mode_batchnorm_warns_that_rows_are_grouped_differently_from_captum():
    """A model left in train mode with BatchNorm normalises over each forward's rows: Captum's IG
    runs all n_steps * B rows in one forward, fastattr in its own chunks, so the numbers differ
    (measured: 0.76-4x of the attribution's size on a small MLP) and running statistics move once
    per forward. fastattr returned them silently; it now says so (Dropout alone mixes no rows: no warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for method in (fastattr.IntegratedGradients(model), fastattr.NoiseTunnel(fastattr.Saliency(model))):
        with pytest.warns(RuntimeWarning, match=r"1 \(BatchNorm1d\) normalise over the rows.*model.eval\(\)") as record:
            method.attribute(x, target=0)
        assert len(record) == 1 and record[0].filename == __file__  # one warning, pointing at the caller
    with warnings.catch_warnings():  # LayerActivation runs the call's rows in one forward, as Captum: no warning
        warnings.simplefilter("error")
        torch.testing.assert_close(fastattr.LayerActivation(model, model[2]).attribute(x), ca.LayerActivation(model, model[2]).attribute(x))
    model.eval()
    model[3].train()  # dropout only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastattr.IntegratedGradients(model).attribute(x, target=0)


def test_llm_result_plots_as_captums():
    """Captum's LLM tutorial ends in attr_res.plot_token_attr(show=True) / plot_seq_attr(): fastattr's
    LLMAttributionResult had neither (AttributeError). They draw Captum's figures from the same fields."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from llm_models import gpt2, word_tokenizer

    tok = word_tokenizer(50, bos=True)
    model = gpt2(len(tok))
    prompt, target = "w1 w2 w3 w4", "w5 w6"
    emb = model.get_input_embeddings()
    got = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(model, emb), tok).attribute(prompt, target=target, n_steps=4, baselines=1)
    ref = ca.LLMGradientAttribution(ca.LayerIntegratedGradients(model, emb), tok).attribute(
        ca.TextTokenInput(prompt, tok, baselines=1), target=target, n_steps=4
    )
    for name in ("plot_token_attr", "plot_seq_attr"):
        fig, ax = getattr(got, name)()
        fig_ref, ax_ref = getattr(ref, name)()
        assert [t.get_text() for t in ax.get_xticklabels()] == [t.get_text() for t in ax_ref.get_xticklabels()]
        assert [t.get_text() for t in ax.get_yticklabels()] == [t.get_text() for t in ax_ref.get_yticklabels()]
        plt.close(fig)
        plt.close(fig_ref)


def test_numpy_integer_targets():
    """target=(np.int64(1),) works in Captum (a tuple indexes the output); fastattr read it as a
    list of one target per example and failed ('target list has 1 entries for 4 examples'). NumPy
    integers (what iterating over a label array gives) now count as ints in every target form."""
    model = Tanh3()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ig = fastattr.IntegratedGradients(model)
    ref = ca.IntegratedGradients(model).attribute(x, target=(np.int64(1),), n_steps=4)
    torch.testing.assert_close(ig.attribute(x, target=(np.int64(1),), n_steps=4), ref)
    torch.testing.assert_close(ig.attribute(x, target=np.int32(1), n_steps=4), ref)
    labels = np.array([0, 1, 2, 1])
    per_row = ca.IntegratedGradients(model).attribute(x, target=labels.tolist(), n_steps=4)
    torch.testing.assert_close(ig.attribute(x, target=list(labels), n_steps=4), per_row)
    torch.testing.assert_close(ig.attribute(x, target=[(v,) for v in labels], n_steps=4), per_row)
    with pytest.raises(AssertionError, match="target"):  # bools are not indices (Captum fails on them too)
        ig.attribute(x, target=[True, False, True, True], n_steps=4)


class ViewAfterConv(nn.Module):
    """x.view(B, -1) after a convolution, then a global mean: any image size runs (in Captum)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        return h.view(x.size(0), -1).mean(1, keepdim=True) * torch.arange(1.0, 3.0)


@pytest.mark.parametrize("method", ["Saliency", "IntegratedGradients"])
def test_channels_last_success_on_one_shape_does_not_break_another(method):
    """The CPU channels-last default remembered a model that once ran channels-last and then never
    fell back: 3x3 images give a 1x1 feature map, whose view works on channels-last strides; the next
    call with 8x8 images raised 'view size is not compatible with input tensor's size and stride'
    where Captum works."""
    model = ViewAfterConv()
    small = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    big = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ours, theirs = getattr(fastattr, method)(model), getattr(ca, method)(model)
    kw = {"n_steps": 4} if method == "IntegratedGradients" else {}
    torch.testing.assert_close(ours.attribute(small, target=1, **kw), theirs.attribute(small, target=1, **kw))
    torch.testing.assert_close(ours.attribute(big, target=1, **kw), theirs.attribute(big, target=1, **kw))


@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_baselines_that_require_grad(multiply_by_inputs):
    """Captum's interpretable-embedding recipe: IG over embedding vectors, the baselines being the
    embeddings of reference ids, so they require grad. fastattr raised 'pow(): functions with out=...
    arguments don't support automatic differentiation' in finalize (Captum's own
    test_compare_with_emb_patching, run by benchmarks/captum_suite.py, failed the same way)."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 5, dtype=torch.float64)
    model = Tanh3()
    ids = torch.tensor([[1], [2], [3], [4]])
    x, x0 = emb(ids).squeeze(1), emb(torch.zeros_like(ids)).squeeze(1)
    assert x0.requires_grad
    got, delta = fastattr.IntegratedGradients(model, multiply_by_inputs=multiply_by_inputs).attribute(
        x, baselines=x0, target=1, n_steps=8, return_convergence_delta=True
    )
    ref, ref_delta = ca.IntegratedGradients(model, multiply_by_inputs=multiply_by_inputs).attribute(
        x, baselines=x0, target=1, n_steps=8, return_convergence_delta=True
    )
    torch.testing.assert_close(got, ref.detach())
    torch.testing.assert_close(delta, ref_delta.detach(), rtol=0, atol=1e-7)  # Captum rounds its weights to float32
    assert not got.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["IntegratedGradients", "LayerIntegratedGradients"])
def test_half_precision_models_get_float32_path_attributions(method, dtype):
    """Captum's IG and LayerIG weight the gradients by float32 step sizes, so a bf16/fp16 model (an
    LLM loaded in bf16) gets float32 attributions there; fastattr returned bf16, on which a Captum
    user's attr.sum(-1).numpy() fails ('Got unsupported ScalarType BFloat16')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    make = (lambda m: m.IntegratedGradients(model)) if method == "IntegratedGradients" else (lambda m: m.LayerIntegratedGradients(model, model[1]))
    got, delta = make(fastattr).attribute(x, target=1, n_steps=8, return_convergence_delta=True)
    ref = make(ca).attribute(x, target=1, n_steps=8)
    assert got.dtype == ref.dtype == torch.float32 and delta.dtype == torch.float32
    got.sum(-1).numpy()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))
    # the Saliency family keeps the input's dtype, as Captum's does
    assert fastattr.Saliency(model).attribute(x, target=1).dtype == ca.Saliency(model).attribute(x, target=1).dtype == dtype
