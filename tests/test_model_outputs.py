"""Models as they come: outputs that are not a bare tensor, and keyword forward arguments.

A model that returns a ``ModelOutput``-like object (``.logits``), a dict or a tuple works in
every class without a wrapper (``.logits`` / a ``"logits"`` key by default, else ``output=``: a
key, an index or a callable), and token models get their attention mask through
``forward_kwargs=`` as well as through ``additional_forward_args``.
"""

from __future__ import annotations

from dataclasses import dataclass

import captum.attr as ca
import pytest
import torch
import torch.nn as nn
from models import assert_attr_close, make

import fastattr
from fastattr.errors import AttributionInputError, OptionError

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]


@dataclass
class ClassifierOutput:
    """Like transformers' SequenceClassifierOutput: logits plus other fields."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Wrapped(nn.Module):
    """An MLP (12 -> 5) whose output comes back in one of several containers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = make("mlp")
        self.kind = kind

    def forward(self, x: torch.Tensor):
        y = self.net(x)
        if self.kind == "model_output":
            return ClassifierOutput(logits=y, hidden_states=(x,))
        if self.kind == "logits_dict":
            return {"loss": None, "logits": y}
        if self.kind == "scores_dict":
            return {"scores": y, "aux": y.sum(1)}
        if self.kind == "tuple":
            return (y.sum(1), y)  # logits second: needs output=1
        if self.kind == "one_tuple":
            return (y,)
        return y


CASES = {  # kind -> output selector
    "model_output": None,
    "logits_dict": None,
    "one_tuple": None,
    "scores_dict": "scores",
    "tuple": 1,
    "callable": lambda out: out.logits,
}


def _calls(model: nn.Module, x: torch.Tensor, **opts):
    """Every class on the same inputs and target, as (name, result)."""
    refs = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    ig = fastattr.IntegratedGradients(model)
    attr, delta = ig.attribute(x, target=2, n_steps=6, return_convergence_delta=True, **opts)
    return [
        ("saliency", fastattr.Saliency(model).attribute(x, target=2, **opts)),
        ("input_x_gradient", fastattr.InputXGradient(model).attribute(x, target=2, **opts)),
        ("ig", attr),
        ("ig_delta", delta),
        ("ig_auto", ig.attribute(x, target=2, n_steps="auto", **opts)),
        ("ccd", ig.compute_convergence_delta(attr, None, x, target=2, **({"output": opts["output"]} if "output" in opts else {}))),
        ("gradient_shap", fastattr.GradientShap(model).attribute(x, refs, n_samples=3, target=2, seed=1, **opts)),
        ("noise_tunnel", fastattr.NoiseTunnel(fastattr.Saliency(model)).attribute(x, nt_samples=3, stdevs=0.1, target=2, seed=2, **opts)),
        ("layer_ig", fastattr.LayerIntegratedGradients(model, model.net.net[0]).attribute(x, target=2, n_steps=6, **opts)),
        ("dataset_fields", fastattr.IntegratedGradients(model).attribute_batch(x, target=2, n_steps=6, **opts).output),
    ]


@pytest.mark.parametrize("kind", list(CASES))
def test_every_class_takes_the_models_own_output(kind):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    plain = Wrapped("tensor")
    model = Wrapped("model_output" if kind == "callable" else kind)
    opts = {} if CASES[kind] is None else {"output": CASES[kind]}
    for (name, got), (_, ref) in zip(_calls(model, x, **opts), _calls(plain, x)):
        assert_attr_close(got, ref), name


def test_ambiguous_or_wrong_outputs_are_named():
    x = torch.randn(2, 12)
    with pytest.raises(AttributionInputError, match=r"got tuple of 2 \(Tensor, Tensor\); pass output="):
        fastattr.Saliency(Wrapped("tuple")).attribute(x, target=0)
    with pytest.raises(AttributionInputError, match=r"got dict with keys \['scores', 'aux'\]"):
        fastattr.Saliency(Wrapped("scores_dict")).attribute(x, target=0)
    with pytest.raises(AttributionInputError, match="output='nope' cannot select"):
        fastattr.Saliency(Wrapped("scores_dict")).attribute(x, target=0, output="nope")
    with pytest.raises(AttributionInputError, match="it must select a tensor"):
        fastattr.Saliency(Wrapped("model_output")).attribute(x, target=0, output="hidden_states")
    with pytest.raises(OptionError, match="output must be None, a key"):
        fastattr.Saliency(Wrapped("tuple")).attribute(x, target=0, output=1.5)


# ------------------------------------------------------------------ token models: keyword forward args


class HFStyleClassifier(nn.Module):
    """forward(input_ids=None, attention_mask=None) -> ClassifierOutput, the Hugging Face way."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids=None, attention_mask=None):
        h = torch.tanh(self.mix(self.embed(input_ids)))
        m = attention_mask.to(h.dtype)[..., None]
        return ClassifierOutput(logits=self.head((h * m).sum(1) / m.sum(1).clamp(min=1)), hidden_states=(h,))


def _tokens():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 30, (5, 7), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def test_forward_kwargs_attention_mask_matches_captum_with_a_wrapper():
    model, (ids, mask) = HFStyleClassifier(), _tokens()
    target = torch.tensor([0, 1, 2, 0, 1])

    def wrapper(input_ids, attention_mask):  # what a Captum user writes
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    ref, ref_delta = ca.LayerIntegratedGradients(wrapper, model.embed).attribute(ids, target=target, additional_forward_args=(mask,), n_steps=8, return_convergence_delta=True)
    lig = fastattr.LayerIntegratedGradients(model, model.embed)
    for cap in (None, 3):  # a small cap splits examples: the mask rows must follow their example
        got, delta = lig.attribute(ids, target=target, forward_kwargs={"attention_mask": mask}, n_steps=8, internal_batch_size=cap, return_convergence_delta=True)
        assert_attr_close(got, ref)
        torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-5)
    padded = lig.attribute_batch(ids, target=target, forward_kwargs={"attention_mask": mask}, n_steps=8, lengths=mask.sum(1), trim_padding=True)
    assert_attr_close(padded.attributions[0], ref)
    acts = fastattr.LayerActivation(model, model.mix).attribute(ids, forward_kwargs={"attention_mask": mask}, max_rows=2)
    torch.testing.assert_close(acts, ca.LayerActivation(wrapper, model.mix).attribute(ids, additional_forward_args=(mask,)))


def test_forward_kwargs_follow_noise_copies_and_reference_draws():
    """Over a float input: the keyword mask is tiled with NoiseTunnel's and GradientShap's copies."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make("mlp")

        def forward(self, x, mask=None):
            return self.net(x * mask)

    model, x = Masked(), torch.randn(4, 12, generator=torch.Generator().manual_seed(5))
    mask = (torch.rand(4, 12, generator=torch.Generator().manual_seed(6)) > 0.3).float()
    refs = torch.randn(5, 12, generator=torch.Generator().manual_seed(7))
    for make_method, kw in (
        (lambda: fastattr.NoiseTunnel(fastattr.IntegratedGradients(model)), dict(nt_samples=3, stdevs=0.2, n_steps=4, seed=3)),
        (lambda: fastattr.GradientShap(model), dict(baselines=refs, n_samples=4, seed=3)),
        (lambda: fastattr.Saliency(model), {}),
    ):
        by_kw = make_method().attribute(x, target=1, forward_kwargs={"mask": mask}, max_rows=5, **kw)
        by_arg = make_method().attribute(x, target=1, additional_forward_args=(mask,), max_rows=5, **kw)
        torch.testing.assert_close(by_kw, by_arg, rtol=1e-6, atol=1e-7)

