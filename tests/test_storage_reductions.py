"""Storage reductions of dataset runs: channel-reduced image maps (run(channel_reduce=)) and float16
storage, recorded in the manifest and read back by fastattr.open, plain h5py, info, verify and audits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import fastattr
from fastattr.audit import audit_run
from fastattr.errors import OptionError, StoreError
from fastattr.store import RunMismatchError, verify_run

pytestmark = pytest.mark.usefixtures("single_thread")

FASTATTR = shutil.which("fastattr") or ""
TORCHRUN = shutil.which("torchrun") or ""


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)


def full_ig(model: nn.Module, x: np.ndarray, n_steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return fastattr.IntegratedGradients(model).attribute(torch.from_numpy(x), target=2, n_steps=n_steps, return_convergence_delta=True)


def reduce_ref(a: torch.Tensor, mode: str) -> np.ndarray:
    a = a.double()
    out = {"sum": a.sum(1), "abs": a.abs().sum(1), "l2": a.square().sum(1).sqrt()}[mode]
    return out.numpy()


@pytest.mark.parametrize("mode", ["sum", "abs", "l2"])
def test_channel_reduced_run_round_trips_through_open_and_plain_h5py(tmp_path, mode):
    model, x = cnn(), images(13)
    fastattr.run(model, x, tmp_path / "r", target=2, n_steps=8, shard_size=5, examples_per_batch=4, progress=False, channel_reduce=mode)
    full, _ = full_ig(model, x)
    want = reduce_ref(full, mode)
    with fastattr.open(tmp_path / "r") as store:
        got = store[:]["attributions"]["x"]
        assert got.shape == (13, 6, 6) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        red = store.channel_reduce
        assert red["mode"] == mode and red["dim"] == 0 and red["input_shapes"] == [[3, 6, 6]] and red["stored_shapes"] == [[6, 6]]
        assert "full attributions" in red["stats"]
        assert store.metadata["channel_reduce"] == red and store.storage_dtype == "float32"
        assert store[7]["attributions"]["x"].shape == (6, 6)
        assert store.field("attributions/x").shape == (13, 6, 6)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"]["channel_reduce"]["mode"] == mode
    # plain h5py: the shapes and, in every shard's config_json, how they were reduced
    shards = sorted((tmp_path / "r").glob("shard-*.h5"))
    parts = []
    for path in shards:
        with h5py.File(path, "r") as f:
            assert json.loads(f.attrs["config_json"])["channel_reduce"]["mode"] == mode
            parts.append((f["index"][()], f["attributions/x"][()]))
    idx = np.concatenate([p[0] for p in parts])
    a = np.concatenate([p[1] for p in parts])[np.argsort(idx)]
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-6)
    assert verify_run(tmp_path / "r").lines()[0].startswith("OK")


def test_stats_and_delta_are_those_of_the_full_attributions(tmp_path):
    model, x = cnn(), images(11)
    fastattr.run(model, x, tmp_path / "r", target=2, n_steps=8, progress=False, channel_reduce="abs")
    full, delta = full_ig(model, x)
    flat = full.double().reshape(11, -1)
    got = fastattr.open(tmp_path / "r")[:]
    want = {"sum": flat.sum(1), "l1": flat.abs().sum(1), "l2": flat.square().sum(1).sqrt(), "absmax": flat.abs().amax(1)}
    for k, v in want.items():
        np.testing.assert_allclose(got["stats"][k], v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
    assert (got["stats"]["nonfinite"] == 0).all()
    np.testing.assert_allclose(got["delta"], delta.numpy(), rtol=1e-4, atol=1e-6)
    # the stored "abs" map's total is the full l1, not the full sum: stats did not come from it
    np.testing.assert_allclose(got["attributions"]["x"].reshape(11, -1).sum(1), got["stats"]["l1"], rtol=1e-5)


def test_reduction_reads_channels_last_memory_without_changing_the_result():
    from fastattr.run_reduce import reduce_channels

    a = torch.randn(4, 3, 5, 7)
    last = a.contiguous(memory_format=torch.channels_last)
    for mode in ("sum", "abs", "l2"):
        np.testing.assert_allclose(reduce_channels(last, mode).numpy(), reduce_channels(a, mode).numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(reduce_channels(a, mode).numpy(), reduce_ref(a, mode), rtol=1e-5, atol=1e-6)
    assert reduce_channels(a.double(), "sum").dtype == torch.float32  # float64 models store float32 like unreduced runs
    five = torch.randn(2, 3, 4, 5, 6)  # (C, D, H, W) samples: only the channel dim goes
    assert reduce_channels(five, "l2").shape == (2, 4, 5, 6)


def test_reduction_through_the_triton_kernel(monkeypatch, triton_interpreter):
    """The CUDA path (kernels/triton_channel_reduce.py) on both memory layouts; on CPU under the interpreter."""
    from fastattr.run_reduce import reduce_channels

    monkeypatch.setenv("FASTATTR_KERNELS", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(3, 3, 7, 9, device=dev)
    for t in (a, a.contiguous(memory_format=torch.channels_last)):
        for mode in ("sum", "abs", "l2"):
            np.testing.assert_allclose(reduce_channels(t, mode).cpu().numpy(), reduce_ref(a.cpu(), mode), rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_changed_channel_reduce(tmp_path):
    model, x = cnn(), images(9)
    kw = {"target": 2, "n_steps": 4, "progress": False}
    fastattr.run(model, x, tmp_path / "r", channel_reduce="sum", **kw)
    assert fastattr.run(model, x, tmp_path / "r", channel_reduce="sum", **kw).computed == 0  # same value: resumes
    with pytest.raises(RunMismatchError, match="channel_reduce"):
        fastattr.run(model, x, tmp_path / "r", channel_reduce="l2", **kw)
    with pytest.raises(RunMismatchError, match="channel_reduce"):
        fastattr.run(model, x, tmp_path / "r", **kw)  # unreduced into a reduced run
    fastattr.run(model, x, tmp_path / "plain", **kw)
    with pytest.raises(RunMismatchError, match="channel_reduce"):
        fastattr.run(model, x, tmp_path / "plain", channel_reduce="sum", **kw)


def test_inputs_without_a_channel_dim_and_other_methods_are_refused_before_any_work(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    vectors = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    with pytest.raises(OptionError, match=r"input 0 has per-sample shape \(8,\)"):
        fastattr.run(mlp, vectors, tmp_path / "a", target=0, progress=False, channel_reduce="sum")
    seq = np.random.default_rng(0).standard_normal((6, 5, 8)).astype(np.float32)  # (T, D): no channel dim either
    with pytest.raises(OptionError, match=r"input 0 has per-sample shape \(5, 8\)"):
        fastattr.run(mlp, seq, tmp_path / "b", target=0, progress=False, channel_reduce="sum")
    two = (images(6), vectors)  # per sample an image and a vector: the vector is named
    with pytest.raises(OptionError, match=r"input 1 has per-sample shape \(8,\)"):
        fastattr.run(mlp, two, tmp_path / "e", target=0, progress=False, channel_reduce="sum")
    with pytest.raises(OptionError, match="channel_reduce must be None or one of 'sum', 'abs', 'l2'"):
        fastattr.run(cnn(), images(4), tmp_path / "c", target=0, progress=False, channel_reduce="mean")
    model = cnn()
    with pytest.raises(OptionError, match="method 'activations' stores other attributions"):
        fastattr.run(model, images(4), tmp_path / "d", method="activations", layer="0", progress=False, channel_reduce="sum")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcde")


def test_saliency_and_noise_tunnel_runs_reduce_too(tmp_path):
    model, x = cnn(), images(6)
    fastattr.run(model, x, tmp_path / "s", method="saliency", target=2, progress=False, channel_reduce="sum")
    sal = fastattr.Saliency(model).attribute(torch.from_numpy(x), target=2)
    np.testing.assert_allclose(fastattr.open(tmp_path / "s")[:]["attributions"]["x"], reduce_ref(sal, "sum"), rtol=1e-5, atol=1e-7)
    fastattr.run(model, x, tmp_path / "nt", method="noise_tunnel", target=2, n_steps=4, nt_samples=2, seed=3, progress=False, channel_reduce="l2")
    assert fastattr.open(tmp_path / "nt")[:]["attributions"]["x"].shape == (6, 6, 6)


# ------------------------------------------------------------------------------------------------
# float16 storage
# ------------------------------------------------------------------------------------------------


def test_float16_storage_is_recorded_and_read_back_in_either_dtype(tmp_path):
    model, x = cnn(), images(10)
    fastattr.run(model, x, tmp_path / "h", target=2, n_steps=8, progress=False, storage_dtype="float16")
    full, _ = full_ig(model, x)
    assert json.loads((tmp_path / "h" / "manifest.json").read_text())["config"]["storage_dtype"] == "float16"
    with fastattr.open(tmp_path / "h") as store:
        assert store.storage_dtype == "float16" and store.channel_reduce is None
        a16 = store[:]["attributions"]["x"]
        assert a16.dtype == np.float16 and store[3]["attributions"]["x"].dtype == np.float16
    with fastattr.open(tmp_path / "h", dtype="float32") as store:
        got = store[:]
        assert got["attributions"]["x"].dtype == np.float32 and next(iter(store))["attributions"]["x"].dtype == np.float32
        assert store.field("attributions/x").dtype == np.float32 and store.field("delta").dtype == np.float32
        np.testing.assert_array_equal(got["attributions"]["x"], a16.astype(np.float32))
    ref = full.numpy()
    err = np.abs(a16.astype(np.float32) - ref)
    assert (err <= np.abs(ref) * 2**-10 + 2**-24).all()  # float16 rounding: half an ulp of an 11-bit significand
    with pytest.raises(StoreError, match="floating dtype"):
        fastattr.open(tmp_path / "h", dtype="int32")
    with h5py.File(next((tmp_path / "h").glob("shard-*.h5")), "r") as f:
        assert f["attributions/x"].dtype == np.float16


def test_float16_cast_on_the_device_counts_overflow_exactly(tmp_path, caplog):
    """The runner casts to float16 before the host copy; values it overflows are counted on top of
    what the run counted itself (here a NaN input's non-finite output and attribution), and logged:
    the same counts as the store's own cast gave when it did the cast (a guard for the move)."""
    import logging

    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.fill_(500.0)
        model.bias.zero_()
    x = np.full((6, 8), 300.0, dtype=np.float32)  # IG ~ 500 * 300 = 1.5e5 per feature: above float16's 65504
    x[:, 4:] = 1.0  # these stay finite
    x[3, 0] = np.nan
    kw = {"n_steps": 4, "target": 0, "progress": False, "allow_nonfinite": True}
    fastattr.run(model, x, str(tmp_path / "f32"), **kw)
    with caplog.at_level(logging.WARNING, logger="fastattr"):
        fastattr.run(model, x, str(tmp_path / "f16"), storage_dtype="float16", **kw)
    assert any("beyond the float16 range" in r.getMessage() for r in caplog.records)
    with fastattr.open(tmp_path / "f32") as r32, fastattr.open(tmp_path / "f16") as r16:
        a32, a16 = r32[:]["attributions"]["x"], r16[:]["attributions"]["x"]
        counts32, counts16 = r32.field("stats/nonfinite"), r16.field("stats/nonfinite")
    with np.errstate(over="ignore"):
        overflowed = (np.isinf(a32.astype(np.float16)) & np.isfinite(a32)).sum(1)
    assert overflowed.tolist() == [4, 4, 4, 3, 4, 4]
    np.testing.assert_array_equal(counts16, counts32 + overflowed)
    assert ((~np.isfinite(a16)).sum(1) <= counts16).all() and counts32[3] > 0
    assert verify_run(tmp_path / "f16").verdict == "OK"  # allow_nonfinite: the samples are listed as facts


def test_the_device_cast_counts_only_values_it_made_non_finite():
    from fastattr.run_reduce import StoredForm

    a = torch.randn(5, 3, 4, 4)
    a[1, 0, 0, 0] = 7e4  # overflows
    a[1, 2, 3, 3] = -65519.0  # rounds to -65504: stays finite
    a[2, 0, 0, 0], a[2, 1, 0, 0] = float("nan"), -1e6  # NaN (not made by the cast) and an overflow
    a[3, 0, 0, 0] = float("inf")  # inf already: not made by the cast
    half, made = StoredForm(None, True).apply(a)
    assert half.dtype == torch.float16 and made.tolist() == [0, 1, 1, 0, 0]
    assert StoredForm(None, True).apply(a[4:])[1].tolist() == [0]  # the fast path: nothing near the limit
    red, made = StoredForm("abs", True).apply(torch.full((2, 3, 2, 2), 3e4))  # 9e4 after the reduction: overflows
    assert red.shape == (2, 2, 2) and made.tolist() == [4, 4]
    assert StoredForm("sum").apply(a)[1] is None


def test_the_device_cast_counts_exactly_at_float16s_rounding_boundary():
    """65504 (float16's max) and 65519.996 stay finite; 65520 (the rounding midpoint) and -65520 become
    inf and are counted; values already inf or NaN are not; the same for channels-last memory."""
    from fastattr.run_reduce import StoredForm

    a = torch.zeros(4, 3, 2, 2)
    a[0, 0, 0, 0], a[0, 1, 0, 0] = 65504.0, -65504.0
    a[1, 0, 0, 0], a[1, 1, 1, 1] = 65520.0, -65520.0
    a[2, 0, 0, 0] = 65519.996
    a[3, 0, 0, 0], a[3, 0, 0, 1], a[3, 2, 1, 1] = float("-inf"), float("nan"), 65520.0
    for x in (a, a.contiguous(memory_format=torch.channels_last)):
        half, made = StoredForm(None, True).apply(x)
        assert made.tolist() == [0, 2, 0, 1]
        assert torch.isinf(half).reshape(4, -1).sum(1).tolist() == [0, 2, 0, 2]
    only_max = torch.full((2, 3, 2, 2), 65504.0)
    assert StoredForm(None, True).apply(only_max)[1].tolist() == [0, 0]
    assert StoredForm("sum", True).apply(only_max)[1].tolist() == [4, 4]  # 3 x 65504 per pixel after the reduction


def test_both_reductions_together(tmp_path):
    model, x = cnn(), images(8)
    fastattr.run(model, x, tmp_path / "b", target=2, n_steps=8, progress=False, storage_dtype="float16", channel_reduce="sum")
    full, _ = full_ig(model, x)
    with fastattr.open(tmp_path / "b") as store:
        a = store[:]["attributions"]["x"]
        assert a.dtype == np.float16 and a.shape == (8, 6, 6)
        np.testing.assert_allclose(a.astype(np.float32), reduce_ref(full, "sum"), rtol=2e-3, atol=1e-5)
    assert verify_run(tmp_path / "b").lines()[0].startswith("OK")


# ------------------------------------------------------------------------------------------------
# audits
# ------------------------------------------------------------------------------------------------


def test_audits_of_reduced_and_float16_runs_match_the_full_float32_run(tmp_path):
    model, x = cnn(), images(24)
    np.save(tmp_path / "x.npy", x)
    masks = np.zeros((24, 3, 6, 6), dtype=bool)
    masks[:, :, 1:4, 2:5] = True
    kw = {"target": "predicted", "n_steps": 8, "progress": False}
    fastattr.run(model, x, tmp_path / "full", **kw)
    fastattr.run(model, x, tmp_path / "sum", channel_reduce="sum", **kw)
    fastattr.run(model, x, tmp_path / "h", storage_dtype="float16", **kw)
    opts = {"model": model, "data": str(tmp_path / "x.npy"), "sample": 24, "steps": 6, "randomization": "all", "seed": 0}
    full = audit_run(tmp_path / "full", masks=masks, **opts).doc
    red = audit_run(tmp_path / "sum", masks=masks, **opts).doc
    half = audit_run(tmp_path / "h", **opts).doc
    # "sum" ranks pixels exactly as the full map's per-pixel channel sum: every channel of a pixel goes together
    for key in ("deletion", "insertion"):
        np.testing.assert_allclose(red["perturbation"][key]["curve"], full["perturbation"][key]["curve"], rtol=1e-6)
        np.testing.assert_allclose(half["perturbation"][key]["curve"], full["perturbation"][key]["curve"], atol=1e-3)
    # re-attribution from the manifest is reduced the same way before comparing with the stored maps
    assert red["randomization"]["reproduced"] > 0.999 and half["randomization"]["reproduced"] > 0.999
    assert red["attribution"]["shape"] == [6, 6]
    assert red["localization"]["mass_inside"]["mean"] == pytest.approx(full["localization"]["mass_inside"]["mean"], rel=0.5)


def test_channel_reduced_run_rendered(tmp_path):
    pytest.importorskip("matplotlib")
    from fastattr.render import render_grid

    model, x = cnn(), np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    fastattr.run(model, x, tmp_path / "r", target=2, n_steps=4, progress=False, channel_reduce="sum")
    a = fastattr.open(tmp_path / "r")[:]["attributions"]["x"]
    render_grid(a, str(tmp_path / "grid.png"), inputs=x)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# command line, torchrun
# ------------------------------------------------------------------------------------------------

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))
    """
)


@pytest.fixture
def cli_env(tmp_path):
    (tmp_path / "red_models.py").write_text(MODELS)
    np.save(tmp_path / "x.npy", images(21))
    return {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}


def cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [FASTATTR] if FASTATTR else [sys.executable, "-m", "fastattr"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_channel_reduce_flag_info_and_verify(tmp_path, cli_env):
    r = cli("run", "--model", "red_models:cnn", "--data", "x.npy", "--out", "r", "--steps", "4", "--target", "2", "--channel-reduce", "l2",
            "--storage-dtype", "float16", "--shard-size", "8", env=cli_env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = cli("info", "r", env=cli_env, cwd=tmp_path)
    assert info.returncode == 0 and "storage: float16" in info.stdout
    assert "channel-reduced: l2 over the channel dim, stored (3, 6, 6) -> (6, 6) per sample" in info.stdout
    assert cli("verify", "r", env=cli_env, cwd=tmp_path).stdout.startswith("OK")
    assert fastattr.open(tmp_path / "r")[:]["attributions"]["x"].shape == (21, 6, 6)
    again = cli("run", "--model", "red_models:cnn", "--data", "x.npy", "--out", "r", "--steps", "4", "--target", "2", "--storage-dtype", "float16",
                env=cli_env, cwd=tmp_path)  # fmt: skip
    assert again.returncode == 2 and "channel_reduce" in again.stderr, again.stderr
    bad = cli("run", "--model", "red_models:cnn", "--data", "x.npy", "--out", "q", "--channel-reduce", "max", env=cli_env, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'max'" in bad.stderr


@pytest.mark.skipif(not TORCHRUN or not torch.distributed.is_available(), reason="torchrun / torch.distributed not available")
def test_torchrun_ranks_store_reduced_maps_and_the_merge_keeps_the_record(tmp_path, cli_env):
    env = {**cli_env, "FASTATTR_DIST_TIMEOUT": "120"}
    cmd = [FASTATTR] if FASTATTR else [sys.executable, "-m", "fastattr"]
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--no-python", *cmd, "run", "--model", "red_models:cnn", "--data", "x.npy",
                        "--out", "d", "--steps", "4", "--target", "2", "--channel-reduce", "sum", "--shard-size", "4"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list((tmp_path / "d").glob("manifest.rank-*"))
    with fastattr.open(tmp_path / "d") as store:
        assert store.status == "complete" and store.channel_reduce["mode"] == "sum"
        got = store[:]["attributions"]["x"]
    sys.path.insert(0, str(tmp_path))
    try:
        import red_models
    finally:
        sys.path.remove(str(tmp_path))
    full, _ = full_ig(red_models.cnn().eval(), images(21), n_steps=4)
    np.testing.assert_allclose(got, reduce_ref(full, "sum"), rtol=1e-4, atol=1e-6)
    assert verify_run(tmp_path / "d").ok
