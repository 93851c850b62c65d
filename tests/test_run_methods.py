"""Dataset runs of every method: what is stored equals the in-memory API on the same samples,
and a method's options are checked before the run directory is touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fastattr

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def data(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


def test_adaptive_run_stores_per_sample_steps_and_convergence(tmp_path):
    model, x = mlp(), data(37)
    summary = fastattr.run(model, x, tmp_path / "run", target=1, n_steps="auto", tolerance=0.02, max_steps=65, examples_per_batch=10, progress=False)
    assert summary.complete and summary.computed == 37
    ref = fastattr.IntegratedGradients(model).attribute_batch(torch.from_numpy(x), None, 1, n_steps="auto", tolerance=0.02, max_steps=65)
    got = fastattr.open(tmp_path / "run")[0:37]
    np.testing.assert_array_equal(got["n_steps"], ref.n_steps.numpy())
    np.testing.assert_array_equal(got["extras"]["converged"], ref.extras["converged"].numpy())
    np.testing.assert_allclose(got["attributions"]["x"], ref.attributions[0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["delta"], ref.delta.numpy(), rtol=1e-4, atol=1e-6)
    assert len(set(got["n_steps"].tolist())) > 1  # samples really refine independently
    ok = got["extras"]["converged"]
    bound = 0.02 * np.abs(got["output"] - got["baseline_output"])
    assert (np.abs(got["delta"][ok]) <= np.maximum(bound[ok], 1e-6) * (1 + 1e-4)).all()
    meta = fastattr.open(tmp_path / "run").metadata
    assert meta["params"]["n_steps"] == "auto" and meta["params"]["tolerance"] == 0.02
    # the end-of-run summary: the distribution of steps and the samples that hit the cap
    st = summary.steps
    assert st["samples"] == 37 and st["max"] == got["n_steps"].max() and st["mean"] == pytest.approx(got["n_steps"].mean())
    assert st["capped"] == int((~ok).sum()) and st["capped_index"] == np.flatnonzero(~ok)[:10].tolist()
    assert sum(st["histogram"].values()) == 37
    assert any(line.startswith("adaptive steps over 37 samples") for line in summary.lines())


def test_adaptive_run_reports_samples_at_the_cap(tmp_path):
    model, x = mlp(), data(12)
    summary = fastattr.run(model, x, tmp_path / "run", target=1, n_steps="auto", tolerance=1e-7, abs_tolerance=0.0, max_steps=24, progress=False)
    assert summary.steps["capped"] == 12 and summary.steps["capped_index"] == list(range(10))
    assert "12 hit the cap before the tolerance (index 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...)" in summary.lines()[-1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_steps": 16, "tolerance": 0.01}, "only apply with n_steps='auto'"),
        ({"n_steps": "auto", "tolerance": -1.0}, "tolerance"),
        ({"n_steps": "many"}, "n_steps"),
        ({"method": "no_such_method"}, "unknown method"),
    ],
)
def test_bad_method_options_fail_before_the_directory_is_made(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastattr.run(mlp(), data(4), tmp_path / "run", target=0, progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("base", ["integrated_gradients", "saliency"])
def test_noise_tunnel_run_equals_api_and_does_not_depend_on_batching(tmp_path, base):
    model, x = mlp(), data(23)
    opts = {"nt_type": "smoothgrad_sq", "nt_samples": 4, "stdevs": 0.3, "seed": 7, "base_method": base}
    fastattr.run(model, x, tmp_path / "a", method="noise_tunnel", target=2, n_steps=8, examples_per_batch=5, progress=False, **opts)
    fastattr.run(model, x, tmp_path / "b", method="smoothgrad", target=2, n_steps=8, examples_per_batch=23, progress=False, **opts)
    a, b = fastattr.open(tmp_path / "a")[0:23], fastattr.open(tmp_path / "b")[0:23]
    np.testing.assert_allclose(a["attributions"]["x"], b["attributions"]["x"], rtol=1e-5, atol=1e-7)  # noise keyed by (seed, index)
    inner = fastattr.IntegratedGradients(model) if base == "integrated_gradients" else fastattr.Saliency(model)
    extra = {"n_steps": 8} if base == "integrated_gradients" else {}
    ref = fastattr.NoiseTunnel(inner).attribute_batch(
        torch.from_numpy(x[10:15]), "smoothgrad_sq", 4, None, 0.3, seed=7, sample_ids=torch.arange(10, 15), target=2, **extra
    )
    np.testing.assert_allclose(a["attributions"]["x"][10:15], ref.attributions[0].numpy(), rtol=1e-5, atol=1e-7)
    params = fastattr.open(tmp_path / "a").metadata["params"]
    assert params["seed"] == 7 and params["nt_samples"] == 4 and params["base_method"] == base


def test_gradient_shap_run_with_array_and_dataset_references(tmp_path):
    model, x = mlp(), data(19)
    refs = data(11, seed=5)
    np.save(tmp_path / "refs.npy", refs)
    fastattr.run(model, x, tmp_path / "a", method="gradient_shap", target=0, references=refs, n_samples=6, seed=3, examples_per_batch=4, progress=False)
    fastattr.run(model, x, tmp_path / "b", method="expected_gradients", target=0, references=str(tmp_path / "refs.npy"), n_samples=6, seed=3, progress=False)
    a, b = fastattr.open(tmp_path / "a")[0:19], fastattr.open(tmp_path / "b")[0:19]
    np.testing.assert_allclose(a["attributions"]["x"], b["attributions"]["x"], rtol=1e-5, atol=1e-7)
    ref = fastattr.GradientShap(model).attribute_batch(torch.from_numpy(x), torch.from_numpy(refs), 6, 0.0, 0, seed=3, sample_ids=torch.arange(19))
    np.testing.assert_allclose(a["attributions"]["x"], ref.attributions[0].numpy(), rtol=1e-5, atol=1e-7)
    assert (a["n_steps"] == 6).all() and "sem" in a["extras"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "noise_tunnel", "nt_samples": 0}, "nt_samples"),
        ({"method": "noise_tunnel", "nt_type": "smooth"}, "nt_type"),
        ({"method": "noise_tunnel", "seed": 1.5}, "seed"),
        ({"method": "noise_tunnel", "n_samples": 3}, "does not take option"),
        ({"method": "gradient_shap"}, "references"),
        ({"method": "saliency", "nt_samples": 3}, "does not take option"),
    ],
)
def test_bad_family_options_fail_before_the_directory_is_made(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastattr.run(mlp(), data(4), tmp_path / "run", target=0, progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_cli_runs_auto_steps_and_smoothgrad(tmp_path):
    """The CLI's method flags reach the run: the stored config says what was asked."""
    import os
    import shutil
    import subprocess
    import sys
    import textwrap

    (tmp_path / "cli_mlp.py").write_text(textwrap.dedent(
        """
        import torch
        from torch import nn

        def mlp():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        """
    ))  # fmt: skip
    np.save(tmp_path / "x.npy", data(9))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [shutil.which("fastattr")] if shutil.which("fastattr") else [sys.executable, "-m", "fastattr"]
    common = ["-q", "run", "--model", "cli_mlp:mlp", "--data", "x.npy", "--target", "1"]
    r = subprocess.run([*cmd, *common, "--out", "auto", "--steps", "auto", "--tolerance", "0.05", "--max-steps", "33"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    params = fastattr.open(tmp_path / "auto").metadata["params"]
    assert params["n_steps"] == "auto" and params["tolerance"] == 0.05 and params["max_steps"] == 33
    r = subprocess.run([*cmd, *common, "--out", "sg", "--method", "smoothgrad", "--nt-samples", "3", "--stdevs", "0.2", "--seed", "4", "--steps", "4"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = fastattr.open(tmp_path / "sg").metadata
    assert meta["method"] == "noise_tunnel" and meta["params"]["nt_samples"] == 3 and meta["params"]["seed"] == 4
    r = subprocess.run([*cmd, *common, "--out", "bad", "--method", "saliency", "--nt-samples", "3"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "does not take option" in r.stderr and r.stderr.count("\n") == 1


def _token_data(n: int = 21, t: int = 10):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from token_models import TokenClassifier, token_batch

    model = TokenClassifier().eval()
    ids, mask, lengths = token_batch(n, t, seed=3)
    return model, ids, mask, lengths


@pytest.mark.parametrize("reduce", ["sum", None])
def test_layer_ig_token_run_with_variable_lengths_read_with_plain_h5py(tmp_path, reduce):
    """A text classifier's (ids, mask) data: the mask goes to the model as a forward arg, IG runs on
    the embedding, per-token attributions are stored as padded rows plus extras/lengths."""
    import h5py

    model, ids, mask, lengths = _token_data()
    summary = fastattr.run(
        model, (ids.numpy(), mask.numpy()), tmp_path / "run", method="layer_ig", layer="embed", layer_reduce=reduce, lengths="mask",
        forward_args_inputs=1, baselines=0, target="predicted", n_steps=16, examples_per_batch=8, shard_size=16, progress=False,
    )  # fmt: skip
    assert summary.complete
    lig = fastattr.LayerIntegratedGradients(model, "embed")
    with torch.no_grad():
        pred = model(ids, mask).argmax(1)
    ref = lig.attribute_batch(ids, 0, pred, (mask,), 16, reduce=reduce)
    got_attr, got_len, got_delta = [], [], []
    for shard in sorted((tmp_path / "run").glob("shard-*.h5")):  # plain h5py, no fastattr
        with h5py.File(shard, "r") as f:
            got_attr.append(f["attributions/embed"][()])
            got_len.append(f["extras/lengths"][()])
            got_delta.append(f["delta"][()])
    attr = np.concatenate(got_attr)
    assert attr.shape == ((21, 10) if reduce else (21, 10, 32))
    np.testing.assert_allclose(attr, ref.attributions[0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate(got_len), lengths.numpy())
    np.testing.assert_allclose(np.concatenate(got_delta), ref.delta.numpy(), rtol=1e-3, atol=1e-5)
    meta = fastattr.open(tmp_path / "run").metadata
    assert meta["params"]["layer"] == ["embed"] and meta["forward_args_inputs"] == 1


def test_activation_capture_run_pooled_per_channel(tmp_path):
    model, ids, mask, lengths = _token_data()
    fastattr.run(
        model, (ids.numpy(), mask.numpy()), tmp_path / "run", method="activations", layer=["embed", "blocks.0"], pool="mean", channel_dim=-1,
        lengths="mask", forward_args_inputs=1, examples_per_batch=8, progress=False,
    )  # fmt: skip
    got = fastattr.open(tmp_path / "run")[0:21]
    ref = fastattr.LayerActivation(model, ["embed", "blocks.0"]).attribute_batch(ids, (mask,), pool="mean", channel_dim=-1, lengths=lengths)
    for name, want in zip(ref.names, ref.attributions):
        np.testing.assert_allclose(got["attributions"][name], want.numpy(), rtol=1e-5, atol=1e-6)
    assert got["attributions"]["embed"].shape == (21, 32)
    assert (got["target"] == -1).all() and np.isnan(got["delta"]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "layer_ig"}, "needs layer="),
        ({"method": "layer_ig", "layer": "no_such_layer"}, "not a submodule"),
        ({"method": "layer_ig", "layer": "embed", "layer_reduce": "mean"}, "layer_reduce"),
        ({"method": "activations", "layer": "embed", "pool": "median"}, "pool"),
        ({"method": "activations", "layer": "embed", "lengths": "auto"}, "lengths"),
        ({"method": "layer_ig", "layer": "embed", "forward_args_inputs": 2}, "forward_args_inputs"),
    ],
)
def test_bad_layer_options_fail_before_the_directory_is_made(tmp_path, kwargs, match):
    model, ids, mask, _ = _token_data(4)
    with pytest.raises(ValueError, match=match):
        fastattr.run(model, (ids.numpy(), mask.numpy()), tmp_path / "run", progress=False, **{"forward_args_inputs": 1, **kwargs})
    assert not (tmp_path / "run").exists()


def test_cli_layer_ig_on_a_token_model(tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    (tmp_path / "tok_cli.py").write_text(textwrap.dedent(
        """
        from token_models import TokenClassifier, token_batch

        def model():
            return TokenClassifier().eval()

        def tokens():
            ids, mask, _ = token_batch(13, 8, seed=1)
            return ids.numpy(), mask.numpy()
        """
    ))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent)]), "OMP_NUM_THREADS": "1"}
    cmd = [shutil.which("fastattr")] if shutil.which("fastattr") else [sys.executable, "-m", "fastattr"]
    r = subprocess.run(
        [*cmd, "-q", "run", "--model", "tok_cli:model", "--data", "tok_cli:tokens", "--forward-args-inputs", "1", "--method", "layer_ig",
         "--layer", "embed", "--layer-reduce", "l2", "--lengths", "mask", "--baseline", "0", "--steps", "8", "--out", "tok"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = fastattr.open(tmp_path / "tok")[0:13]
    assert got["attributions"]["embed"].shape == (13, 8) and (got["attributions"]["embed"] >= 0).all()  # L2 per token
    sys.path.insert(0, str(Path(__file__).parent))
    from token_models import token_batch

    np.testing.assert_array_equal(got["extras"]["lengths"], token_batch(13, 8, seed=1)[2].numpy())


def test_manifest_rebuilds_the_run_for_audits(tmp_path):
    """fastattr.audit re-attributes with the run's own plan, rebuilt from the manifest: for the first
    samples (global indices 0..k-1, so the same seeded noise) it reproduces the stored values."""
    from fastattr.audit import AuditError, method_from_run

    model, x = mlp(), data(16)
    fastattr.run(model, x, tmp_path / "sg", method="smoothgrad", target=1, nt_samples=3, stdevs=0.2, seed=5, n_steps=6, progress=False)
    store = fastattr.open(tmp_path / "sg")
    again = method_from_run(store.metadata)(model, torch.from_numpy(x[:8]), torch.full((8,), 1))
    np.testing.assert_allclose(again.numpy(), store[0:8]["attributions"]["x"], rtol=1e-5, atol=1e-7)
    fastattr.run(model, x, tmp_path / "gs", method="gradient_shap", target=1, references=data(5, seed=9), progress=False)
    with pytest.raises(AuditError, match="--randomization none"):
        method_from_run(fastattr.open(tmp_path / "gs").metadata)
