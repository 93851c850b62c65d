"""LayerIntegratedGradients: parity with Captum 0.9 on a small transformer text classifier
(IG on the token embedding, attention mask as an additional forward arg), completeness,
the row cap in every forward, per-token reductions, lengths, and clear early errors."""

from __future__ import annotations

import warnings

import captum.attr as ca
import pytest
import torch
import torch.nn.functional as F
from models import CLASSES, assert_attr_close, make, make_inputs, rel_l2
from token_models import PAD, Reused, RowCounter, TokenClassifier, token_batch

import fastattr
from fastattr.layer_methods import LayerIntegratedGradients, PaddingNotIgnoredError, lengths_from_mask

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]

B, T = 4, 12
TARGET = [0, 1, 2, 1]


@pytest.fixture(scope="module")
def tok():
    model = TokenClassifier()
    ids, mask, lengths = token_batch(B, T)
    return model, ids, mask, lengths


def both(model, layer, ids, *args, mbi=True, **kw):
    got = LayerIntegratedGradients(model, layer, multiply_by_inputs=mbi).attribute(
        ids, *args, return_convergence_delta=True, **kw
    )
    ref = ca.LayerIntegratedGradients(model, layer, multiply_by_inputs=mbi).attribute(
        ids, *args, return_convergence_delta=True, **kw
    )
    return got, ref


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_right"])
@pytest.mark.parametrize("baselines", ["none", "pad", "one_row"])
def test_embedding_parity_with_captum(tok, method, baselines):
    model, ids, mask, _ = tok
    base = {
        "none": None,
        "pad": torch.full_like(ids, PAD),
        "one_row": torch.randint(1, 50, (1, T), generator=torch.Generator().manual_seed(3)),
    }[baselines]
    (got, delta), (ref, ref_delta) = both(model, model.embed, ids, base, TARGET, (mask,), n_steps=8, method=method)
    assert got.shape == (B, T, 32)
    assert_attr_close(got, ref)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("mbi", [True, False])
def test_parity_options(tok, mbi):
    """multiply_by_inputs, internal_batch_size smaller than the batch, a tensor target."""
    model, ids, mask, _ = tok
    (got, _), (ref, _) = both(
        model, model.embed, ids, None, torch.tensor(TARGET), (mask,), mbi=mbi, n_steps=6, internal_batch_size=3
    )
    assert_attr_close(got, ref)


def test_list_of_layers_and_layer_input(tok):
    model, ids, mask, _ = tok
    layers = [model.blocks[1].mlp, model.embed]
    (got, delta), (ref, ref_delta) = both(model, layers, ids, None, TARGET, (mask,), n_steps=6)
    assert isinstance(got, list) and len(got) == 2
    for g, r in zip(got, ref):
        assert_attr_close(g, r)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=2e-6)
    # a block's input is the tuple (h, key_bias): both float parts are attributed, as in Captum
    (got, _), (ref, _) = both(
        model, model.blocks[1], ids, None, TARGET, (mask,), n_steps=6, attribute_to_layer_input=True
    )
    assert isinstance(got, tuple) and len(got) == 2
    assert_attr_close(got, ref)


def test_cnn_layer_parity_with_captum():
    """4-D activations run channels-last inside the engine; the result is in the user's layout."""
    model = make("cnn")
    (x,) = make_inputs("cnn")
    t = torch.randint(0, CLASSES["cnn"], (4,), generator=torch.Generator().manual_seed(7))
    (got, delta), (ref, ref_delta) = both(model, model.conv2, x, None, t, n_steps=8)
    assert got.shape == ref.shape == (4, 8, 4, 4)
    assert_attr_close(got, ref)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=2e-6)


def test_completeness_on_embedding(tok):
    """GELU model: the residual falls spectrally with Gauss-Legendre steps (measured max
    |delta| / |F(x) - F(x0)|: 7e-3 at 4 steps, 1.5e-5 at 8, 5.5e-7 at 16)."""
    model, ids, mask, _ = tok
    lig = LayerIntegratedGradients(model, model.embed)
    res = lig.attribute_batch(ids, None, TARGET, (mask,), n_steps=16)
    gap = res.output - res.baseline_output
    assert bool((gap.abs() > 1e-2).all())  # a non-trivial difference to explain
    sums = res.attributions[0].reshape(B, -1).sum(1)
    torch.testing.assert_close(res.delta, sums - gap, rtol=0, atol=1e-6)
    assert float((res.delta.abs() / gap.abs()).max()) < 1e-4
    coarse = lig.attribute_batch(ids, None, TARGET, (mask,), n_steps=4)
    assert float(coarse.delta.abs().max()) > float(res.delta.abs().max())  # the residual measures the error


def test_no_forward_exceeds_the_row_cap(tok):
    model, ids, mask, _ = tok
    counted = RowCounter(model)
    cap = 5
    res = LayerIntegratedGradients(counted, counted.model.embed).attribute_batch(
        ids, None, TARGET, (mask,), n_steps=7, internal_batch_size=cap
    )
    assert counted.rows and max(counted.rows) <= cap
    # capture (x and x0: 2B rows) plus the 7 x B gradient grid, nothing more
    assert sum(counted.rows) == 2 * B + 7 * B
    full = LayerIntegratedGradients(model, model.embed).attribute_batch(ids, None, TARGET, (mask,), n_steps=7)
    torch.testing.assert_close(res.attributions[0], full.attributions[0], rtol=1e-5, atol=1e-7)


def test_per_token_reductions_lengths_and_names(tok):
    model, ids, mask, lengths = tok
    lig = LayerIntegratedGradients(model, "embed")
    full = lig.attribute_batch(ids, None, TARGET, (mask,), n_steps=6)
    assert full.names == ["embed"] and full.extras == {}
    a = full.attributions[0]
    for mode, expect in (("sum", a.sum(-1)), ("l2", a.norm(dim=-1)), ("abs", a.abs().sum(-1))):
        red = lig.attribute_batch(ids, None, TARGET, (mask,), n_steps=6, reduce=mode, lengths=lengths)
        assert red.attributions[0].shape == (B, T)
        torch.testing.assert_close(red.attributions[0], expect, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(red.delta, full.delta)  # stats and delta are over the full tensor
        torch.testing.assert_close(red.stats.l2, full.stats.l2)
        assert torch.equal(red.extras["lengths"], lengths)
    assert torch.equal(lengths_from_mask(mask), lengths)
    # positions past a row's length carry (almost) nothing: the mask hides them from the output
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    per_token = lig.attribute_batch(ids, None, TARGET, (mask,), n_steps=6, reduce="l2").attributions[0]
    assert float(per_token[pad].max()) < 1e-4 * float(per_token.max())


def test_mixed_precision_close_to_fp32(tok):
    """Measured relative L2 error vs fp32 at 16 steps: bf16 2.3e-3, fp16 2.6e-4."""
    model, ids, mask, _ = tok
    lig = LayerIntegratedGradients(model, model.embed)
    ref = lig.attribute(ids, None, TARGET, (mask,), n_steps=16)
    assert rel_l2(lig.attribute(ids, None, TARGET, (mask,), n_steps=16, precision="bf16"), ref) < 2e-2
    assert rel_l2(lig.attribute(ids, None, TARGET, (mask,), n_steps=16, precision="fp16"), ref) < 5e-3


def test_exported_from_package():
    assert fastattr.LayerIntegratedGradients is LayerIntegratedGradients


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduce": "mean"}, "reduce must be"),
        ({"lengths": torch.ones(3, dtype=torch.long)}, r"lengths must have shape \(4,\)"),
        ({"lengths": torch.ones(4)}, "lengths must hold integers"),
        ({"method": "simpson"}, ""),
        ({"target": [0, 1]}, "target list has 2 entries"),
        ({"internal_batch_size": 0}, "positive int"),
    ],
)
def test_bad_arguments_fail_before_any_forward(tok, kwargs, match):
    model, ids, mask, _ = tok
    counted = RowCounter(model)
    kw = {"target": TARGET, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        LayerIntegratedGradients(counted, counted.model.embed).attribute_batch(
            ids, None, additional_forward_args=(mask,), n_steps=4, **kw
        )
    assert counted.rows == []


def test_layer_errors(tok):
    model, ids, mask, _ = tok
    with pytest.raises(ValueError, match="not a submodule"):
        LayerIntegratedGradients(model, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        LayerIntegratedGradients(model, "nope")
    with pytest.raises(ValueError, match="device_ids"):
        LayerIntegratedGradients(model, model.embed, device_ids=[0, 1])
    with pytest.raises(fastattr.AttributionInputError, match="no floating-point tensor input"):
        LayerIntegratedGradients(model, model.embed).attribute(
            ids, None, TARGET, (mask,), n_steps=4, attribute_to_layer_input=True
        )
    with pytest.raises(fastattr.AttributionInputError, match="without the batch"):
        LayerIntegratedGradients(model, model.pos).attribute(ids, None, TARGET, (mask,), n_steps=4)
    reused = Reused()
    with pytest.raises(fastattr.AttributionInputError, match="ran 2 times in one forward"):
        LayerIntegratedGradients(reused, reused.lin).attribute(torch.randn(3, 6), target=0, n_steps=4)


def test_adaptive_steps_on_the_embedding(tok):
    """n_steps='auto' refines each sample to the completeness tolerance, as IntegratedGradients does,
    and converges towards a many-step fixed rule."""
    model, ids, mask, _ = tok
    lig = LayerIntegratedGradients(model, "embed")
    res = lig.attribute_batch(ids, None, TARGET, (mask,), n_steps="auto", tolerance=1e-3, max_steps=120)
    ok = res.extras["converged"]
    scale = torch.clamp(1e-3 * (res.output - res.baseline_output).abs(), min=1e-6)
    assert ok.any() and (res.delta[ok].abs() <= scale[ok] * (1 + 1e-3)).all()
    assert res.n_steps.shape == (B,) and (res.n_steps >= 5).all()  # simpson: 2^k + 1 points per sample
    ref = lig.attribute(ids, None, TARGET, (mask,), n_steps=256)
    assert rel_l2(res.attributions[0], ref) < 1e-3
    with pytest.raises(ValueError, match="only apply with n_steps='auto'"):
        lig.attribute(ids, None, TARGET, (mask,), n_steps=8, tolerance=0.1)


# ---------------------------------------------------------------- padding-aware pass (trim_padding)
class ShapeSpy(torch.nn.Module):
    """Wraps a token model and records (rows, positions) of every forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.shapes: list[tuple[int, int]] = []

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(ids.shape))
        return self.model(ids, mask)


class MeanOverAll(TokenClassifier):
    """Pools over every position, padding included: its output depends on the padding."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        key_bias = ((1 - mask) * -1e4)[:, None, None, :]
        for block in self.blocks:
            h = block(h, key_bias)
        return self.head(F.gelu(self.norm(h).mean(1)))


@pytest.fixture(scope="module")
def tok16():
    """16 rows of lengths 2..12 padded to 12 (several rows per length, one full row)."""
    model = TokenClassifier()
    ids, mask, lengths = token_batch(16, T, seed=5)
    target = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(6))
    return model, ids, mask, lengths, target


@pytest.mark.parametrize("mbi", [True, False])
@pytest.mark.parametrize("cap", [None, 7])
def test_trim_padding_equals_the_full_length_pass(tok16, mbi, cap):
    model, ids, mask, lengths, target = tok16
    spy = ShapeSpy(model)
    lig = LayerIntegratedGradients(spy, spy.model.embed, multiply_by_inputs=mbi)
    kw = {"n_steps": 8, "internal_batch_size": cap}
    full = lig.attribute_batch(ids, None, target, (mask,), trim_padding=False, **kw)
    spy.shapes.clear()
    got = lig.attribute_batch(ids, None, target, (mask,), lengths=lengths, trim_padding=True, **kw)
    assert min(t for _, t in spy.shapes) < T  # forwards really ran cut
    if cap is not None:
        assert max(r for r, _ in spy.shapes) <= cap
    torch.testing.assert_close(got.attributions[0], full.attributions[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.delta, full.delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.stats.l2, full.stats.l2, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.output, full.output) and torch.equal(got.baseline_output, full.baseline_output)
    # positions past a row's length get exactly 0, whatever rows shared its chunks
    past = torch.arange(T)[None, :] >= lengths[:, None]
    assert bool((got.attributions[0][past] == 0).all())


def test_trim_padding_keeps_the_original_order(tok16):
    """Rows are integrated sorted by length; results come back in the caller's order."""
    model, ids, mask, lengths, target = tok16
    lig = LayerIntegratedGradients(model, model.embed)
    res = lig.attribute_batch(ids, None, target, (mask,), n_steps=6, lengths=lengths, trim_padding=True)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(9))
    shuffled = lig.attribute_batch(
        ids[perm], None, target[perm], (mask[perm],), n_steps=6, lengths=lengths[perm], trim_padding=True
    )
    torch.testing.assert_close(shuffled.attributions[0], res.attributions[0][perm], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shuffled.delta, res.delta[perm], rtol=1e-5, atol=1e-6)


def test_trim_padding_parity_with_captum(tok):
    model, ids, mask, lengths = tok
    got, delta = LayerIntegratedGradients(model, model.embed).attribute(
        ids, None, TARGET, (mask,), n_steps=8, return_convergence_delta=True, lengths=lengths, trim_padding=True
    )
    ref, ref_delta = ca.LayerIntegratedGradients(model, model.embed).attribute(
        ids, None, TARGET, (mask,), n_steps=8, return_convergence_delta=True
    )
    assert_attr_close(got, ref)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=2e-6)


def test_trim_padding_row_cap_and_forward_count(tok16):
    """The check (2B rows, in <= 16 forwards) and the IG grid are the only extra rows; none above the cap."""
    model, ids, mask, lengths, target = tok16
    counted = RowCounter(model)
    cap = 5
    LayerIntegratedGradients(counted, counted.model.embed).attribute_batch(
        ids, None, target, (mask,), n_steps=7, internal_batch_size=cap, lengths=lengths, trim_padding=True
    )
    assert max(counted.rows) <= cap
    assert sum(counted.rows) == 2 * 16 + 2 * 16 + 7 * 16  # capture, exactness check, gradient grid


def test_trim_padding_under_bf16(tok16):
    model, ids, mask, lengths, target = tok16
    lig = LayerIntegratedGradients(model, model.embed)
    ref = lig.attribute(ids, None, target, (mask,), n_steps=16)
    got = lig.attribute(ids, None, target, (mask,), n_steps=16, precision="bf16", lengths=lengths, trim_padding=True)
    assert rel_l2(got, ref) < 2e-2


def test_attribute_batch_trims_by_default_with_lengths(tok16):
    model, ids, mask, lengths, target = tok16
    spy = ShapeSpy(model)
    lig = LayerIntegratedGradients(spy, spy.model.embed)
    lig.attribute_batch(ids, None, target, (mask,), n_steps=4)
    assert min(t for _, t in spy.shapes) == T  # no lengths: never cut
    spy.shapes.clear()
    lig.attribute_batch(ids, None, target, (mask,), n_steps=4, lengths=lengths)
    assert min(t for _, t in spy.shapes) < T
    spy.shapes.clear()
    lig.attribute(ids, None, target, (mask,), n_steps=4, lengths=lengths)  # attribute(): off unless asked
    assert min(t for _, t in spy.shapes) == T


def test_padding_dependent_model_is_detected(tok16):
    _, ids, mask, lengths, target = tok16
    model = MeanOverAll()
    lig = LayerIntegratedGradients(model, model.embed, multiply_by_inputs=False)  # gradients: nonzero at the padding
    with pytest.raises(PaddingNotIgnoredError, match="changes when trailing padding is cut off"):
        lig.attribute(ids, None, target, (mask,), n_steps=4, lengths=lengths, trim_padding=True)
    # the default of attribute_batch falls back to the full-length pass, with a warning
    full = lig.attribute_batch(ids, None, target, (mask,), n_steps=4, trim_padding=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lig.attribute_batch(ids, None, target, (mask,), n_steps=4, lengths=lengths)
    assert any("full-length pass instead" in str(w.message) for w in caught)
    torch.testing.assert_close(res.attributions[0], full.attributions[0])
    assert float(res.attributions[0][torch.arange(T)[None, :] >= lengths[:, None]].abs().max()) > 0


def test_trim_padding_errors(tok):
    model, ids, mask, lengths = tok
    counted = RowCounter(model)
    lig = LayerIntegratedGradients(counted, counted.model.embed)
    with pytest.raises(ValueError, match="trim_padding=True needs lengths"):
        lig.attribute(ids, None, TARGET, (mask,), n_steps=4, trim_padding=True)
    with pytest.raises(ValueError, match="not supported with n_steps='auto'"):
        lig.attribute_batch(ids, None, TARGET, (mask,), n_steps="auto", lengths=lengths, trim_padding=True)
    with pytest.raises(ValueError, match="trim_padding must be"):
        lig.attribute_batch(ids, None, TARGET, (mask,), n_steps=4, lengths=lengths, trim_padding="yes")
    assert counted.rows == []  # all before any forward
    # a block's input (h, key_bias (B, 1, 1, T)) has no common sequence dim 1
    with pytest.raises(fastattr.AttributionInputError, match="cannot apply: every attributed layer value"):
        LayerIntegratedGradients(model, model.blocks[0]).attribute(
            ids, None, TARGET, (mask,), n_steps=4, attribute_to_layer_input=True, lengths=lengths, trim_padding=True
        )
    with pytest.raises(fastattr.AttributionInputError, match="lengths go up to 13"):
        LayerIntegratedGradients(model, model.embed).attribute(
            ids, None, TARGET, (mask,), n_steps=4, lengths=torch.full((B,), T + 1), trim_padding=True
        )
