"""LayerActivation: parity with Captum's LayerActivation, the row cap, per-channel pooling
(masked by lengths for padded token rows), the BatchResult for dataset runs, and errors."""

from __future__ import annotations

import captum.attr as ca
import pytest
import torch
from models import assert_attr_close, make, make_inputs
from token_models import Reused, RowCounter, TokenClassifier, token_batch

import fastattr
from fastattr.activations import LayerActivation, pool_channels

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]

B, T = 5, 10


@pytest.fixture(scope="module")
def tok():
    model = TokenClassifier()
    ids, mask, lengths = token_batch(B, T, seed=4)
    return model, ids, mask, lengths


def test_parity_with_captum(tok):
    model, ids, mask, _ = tok
    for layer, to_input in ((model.embed, False), ([model.blocks[0].mlp, model.norm], False), (model.blocks[1], True)):
        got = LayerActivation(model, layer).attribute(ids, (mask,), attribute_to_layer_input=to_input)
        ref = ca.LayerActivation(model, layer).attribute(ids, (mask,), attribute_to_layer_input=to_input)
        assert type(got) is type(ref)
        for g, r in zip(got, ref) if isinstance(ref, list) else [(got, ref)]:
            assert_attr_close(g, r)


def test_row_cap_and_chunk_invariance(tok):
    model, ids, mask, _ = tok
    counted = RowCounter(model)
    act = LayerActivation(counted, ["model.embed", "model.blocks.1"])
    res = act.attribute_batch(ids, (mask,), max_rows=2)
    assert counted.rows == [2, 2, 1]
    assert res.names == ["model.embed", "model.blocks.1"]
    whole = act.attribute_batch(ids, (mask,))
    for a, b in zip(res.attributions, whole.attributions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batch_result_fields(tok):
    model, ids, mask, lengths = tok
    res = LayerActivation(model, model.blocks[0]).attribute_batch(ids, (mask,), lengths=lengths)
    (a,) = res.attributions
    assert a.shape == (B, T, 32) and a.dtype == torch.float32
    assert res.output is None and res.delta is None and res.target is None and res.n_steps == 0
    assert torch.equal(res.extras["lengths"], lengths)
    flat = a.reshape(B, -1)
    torch.testing.assert_close(res.stats.sum, flat.sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.stats.l2, flat.norm(dim=1))
    torch.testing.assert_close(res.stats.absmax, flat.abs().amax(1))


@pytest.mark.parametrize("pool", ["mean", "max", "sum", "l2"])
def test_token_pooling_masks_padding(tok, pool):
    model, ids, mask, lengths = tok
    full = LayerActivation(model, model.blocks[1]).attribute(ids, (mask,))
    res = LayerActivation(model, model.blocks[1]).attribute_batch(
        ids, (mask,), pool=pool, channel_dim=-1, lengths=lengths, max_rows=3
    )
    (got,) = res.attributions
    assert got.shape == (B, 32)
    for b in range(B):
        real = full[b, : lengths[b]]  # (len, D): only real tokens count
        expect = {"mean": real.mean(0), "max": real.amax(0), "sum": real.sum(0), "l2": real.norm(dim=0)}[pool]
        torch.testing.assert_close(got[b], expect, rtol=1e-5, atol=1e-5)


def test_conv_pooling_per_channel():
    model = make("cnn")
    (x,) = make_inputs("cnn")
    full = LayerActivation(model, model.conv1).attribute(x)
    got = LayerActivation(model, model.conv1).attribute_batch(x, pool="mean").attributions[0]
    assert got.shape == (4, 8)
    torch.testing.assert_close(got, full.mean((2, 3)))
    torch.testing.assert_close(pool_channels(full, "l2", 1), full.flatten(2).norm(dim=2))


def test_bf16_capture_is_stored_as_float32(tok):
    model, ids, mask, _ = tok
    ref = LayerActivation(model, model.blocks[0].mlp).attribute(ids, (mask,))
    res = LayerActivation(model, model.blocks[0].mlp).attribute_batch(ids, (mask,), precision="bf16")
    assert res.attributions[0].dtype == torch.float32
    rel = float((res.attributions[0] - ref).norm() / ref.norm())
    assert rel < 2e-2  # bf16 keeps ~3 significant digits per op


def test_errors(tok):
    model, ids, mask, lengths = tok
    act = LayerActivation(model, model.embed)
    with pytest.raises(ValueError, match="pool must be"):
        act.attribute_batch(ids, (mask,), pool="median")
    with pytest.raises(ValueError, match="max_rows must be a positive int"):
        act.attribute_batch(ids, (mask,), max_rows=0)
    with pytest.raises(fastattr.AttributionInputError, match="channel_dim must be another dim"):
        act.attribute_batch(ids, (mask,), pool="mean", lengths=lengths)
    with pytest.raises(fastattr.AttributionInputError, match="no floating-point tensor"):
        act.attribute(ids, (mask,), attribute_to_layer_input=True)  # token ids
    reused = Reused()
    with pytest.raises(fastattr.AttributionInputError, match="ran 2 times"):
        LayerActivation(reused, "lin").attribute(torch.randn(2, 6))
    unused = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)})
    with pytest.raises(fastattr.AttributionInputError, match="did not run"):
        LayerActivation(lambda x: unused["a"](x), unused["b"]).attribute(torch.randn(2, 3))
