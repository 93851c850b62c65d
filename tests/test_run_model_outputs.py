"""fastattr.run over models as they come: ModelOutput / dict / tuple outputs, output=, forward_kwargs=.

target="predicted" takes the prediction from the same tensor the method attributes (the output's
.logits, or output=); forward_kwargs with one row per sample are sliced per batch like the data;
both are recorded in the run's config. Option errors of a run are OptionError (one line in the CLI).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model_outputs import HFStyleClassifier, Wrapped, _tokens

import fastattr
from fastattr.errors import OptionError, RunMismatchError

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]


def pick_scores(out):
    return out["scores"]


OUTPUTS = {  # Wrapped kind -> output= (None: the default .logits / "logits" / 1-tuple)
    "model_output": None,
    "logits_dict": None,
    "one_tuple": None,
    "tuple": 1,
    "scores_dict": "scores",
    "callable": pick_scores,
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
@pytest.mark.parametrize("method", ["integrated_gradients", "saliency"])
def test_run_predicted_on_a_model_that_does_not_return_a_tensor(tmp_path, kind, method):
    model = Wrapped("scores_dict" if kind == "callable" else kind)
    x = np.random.default_rng(3).standard_normal((11, 12)).astype(np.float32)
    opts = {} if OUTPUTS[kind] is None else {"output": OUTPUTS[kind]}
    summary = fastattr.run(model, x, tmp_path / "run", method=method, target="predicted", n_steps=6, examples_per_batch=4, progress=False, **opts)
    assert summary.complete
    plain = model.net  # the same weights, returning the logits tensor
    fastattr.run(plain, x, tmp_path / "plain", method=method, target="predicted", n_steps=6, examples_per_batch=4, progress=False)
    got, ref = fastattr.open(tmp_path / "run"), fastattr.open(tmp_path / "plain")
    with torch.no_grad():
        pred = plain(torch.from_numpy(x)).argmax(1).numpy()
    np.testing.assert_array_equal(got.field("target"), pred)
    np.testing.assert_allclose(got[:]["attributions"]["x"], ref[:]["attributions"]["x"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.field("output"), ref.field("output"), rtol=1e-6, atol=1e-7)
    recorded = got.metadata.get("output")
    if kind == "callable":
        assert recorded == {"callable": f"{__name__}.pick_scores", "code": recorded.get("code")} and len(recorded["code"]) == 32  # name + code digest
    else:
        assert recorded == OUTPUTS[kind]  # absent (None) when not given, so older runs still resume


def test_run_output_selector_errors_name_the_fix(tmp_path):
    x = np.zeros((3, 12), np.float32)
    with pytest.raises(fastattr.errors.AttributionInputError, match="pass output="):
        fastattr.run(Wrapped("tuple"), x, tmp_path / "a", target="predicted", n_steps=4, progress=False)
    with pytest.raises(OptionError, match="output must be None, a key"):
        fastattr.run(Wrapped("tuple"), x, tmp_path / "b", output=1.5, progress=False)
    with pytest.raises(OptionError, match="forward_kwargs must be a dict"):
        fastattr.run(Wrapped("tuple"), x, tmp_path / "c", forward_kwargs=[1], progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_run_forward_kwargs_mask_per_sample_equals_forward_args_inputs(tmp_path):
    """An HF-style classifier (ModelOutput, attention_mask keyword): the mask as forward_kwargs
    (one row per sample, sliced per batch) gives what forward_args_inputs=1 and the in-memory API give."""
    model, (ids, mask) = HFStyleClassifier(), _tokens()
    common = dict(method="layer_ig", layer="embed", target="predicted", n_steps=8, examples_per_batch=2, progress=False)
    fastattr.run(model, ids.numpy(), tmp_path / "kw", forward_kwargs={"attention_mask": mask.numpy()}, **common)
    fastattr.run(model, (ids.numpy(), mask.numpy()), tmp_path / "args", forward_args_inputs=1, **common)
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(1)
    ref = fastattr.LayerIntegratedGradients(model, model.embed).attribute(ids, target=pred, forward_kwargs={"attention_mask": mask}, n_steps=8)
    kw, args = fastattr.open(tmp_path / "kw"), fastattr.open(tmp_path / "args")
    np.testing.assert_array_equal(kw.field("target"), pred.numpy())
    np.testing.assert_allclose(kw[:]["attributions"]["embed"], ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kw[:]["attributions"]["embed"], args[:]["attributions"]["embed"], rtol=1e-6, atol=1e-7)
    recorded = kw.metadata["forward_kwargs"]["attention_mask"]
    assert recorded["array"] == list(mask.shape) and len(recorded["sha256"]) == 32
    # the same call resumes (nothing to do); another mask is another run
    assert fastattr.run(model, ids.numpy(), tmp_path / "kw", forward_kwargs={"attention_mask": mask.numpy()}, **common).computed == 0
    with pytest.raises(RunMismatchError):
        fastattr.run(model, ids.numpy(), tmp_path / "kw", forward_kwargs={"attention_mask": np.ones_like(mask.numpy())}, **common)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be 'auto' or a positive int"),
        ({"examples_per_batch": 0}, "examples_per_batch must be a positive int"),
        ({"target": "best"}, "target must be an int"),
        ({"target": np.zeros(4, np.float32)}, "must hold integers"),
        ({"target": np.zeros(3, np.int64)}, "per-sample target array has shape"),
        ({"forward_args_inputs": 1}, "forward_args_inputs must be an int"),
    ],
)
def test_run_option_errors_are_option_errors(tmp_path, kwargs, match):
    with pytest.raises(OptionError, match=match):
        fastattr.run(Wrapped("plain"), np.zeros((4, 12), np.float32), tmp_path / "run", progress=False, **kwargs)


@pytest.mark.parametrize(
    ("method", "extra", "key"),
    [
        ("input_x_gradient", {}, "x"),
        ("noise_tunnel", {"nt_samples": 3, "stdevs": 0.1, "base_method": "saliency"}, "x"),
        ("gradient_shap", {"references": np.zeros((2, 12), np.float32), "n_samples": 3}, "x"),
        ("layer_ig", {"layer": "net.net.2"}, "net.net.2"),
    ],
)
def test_every_run_method_attributes_the_selected_output(tmp_path, method, extra, key):
    """output=1 of a (sum, logits) tuple reaches each method: the same as the plain logits model."""
    model = Wrapped("tuple")
    x = np.random.default_rng(4).standard_normal((6, 12)).astype(np.float32)
    common = dict(method=method, target="predicted", n_steps=5, examples_per_batch=4, progress=False, **extra)
    fastattr.run(model, x, tmp_path / "run", output=1, **common)
    plain_extra = {**extra, "layer": "net.2"} if method == "layer_ig" else extra
    fastattr.run(model.net, x, tmp_path / "plain", **{**common, **plain_extra})
    got, ref = fastattr.open(tmp_path / "run")[:], fastattr.open(tmp_path / "plain")[:]
    np.testing.assert_array_equal(got["target"], ref["target"])
    np.testing.assert_allclose(got["attributions"][key], ref["attributions"]["net.2" if method == "layer_ig" else key], rtol=1e-6, atol=1e-7)


def test_the_randomization_audit_refuses_a_run_it_cannot_rebuild(tmp_path):
    """A run made with output= or forward_kwargs=: the audit's re-attribution would silently drop them."""
    from fastattr.audit.randomization import method_from_run
    from fastattr.errors import AuditError

    x = np.random.default_rng(5).standard_normal((3, 12)).astype(np.float32)
    fastattr.run(Wrapped("tuple"), x, tmp_path / "run", output=1, n_steps=4, progress=False)
    with pytest.raises(AuditError, match="output="):
        method_from_run(fastattr.open(tmp_path / "run").metadata)
    fastattr.run(Wrapped("plain"), x, tmp_path / "plain", n_steps=4, progress=False)
    assert callable(method_from_run(fastattr.open(tmp_path / "plain").metadata))  # runs without them: unchanged
