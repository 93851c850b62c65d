"""Dataset runs whose records could be silently stale or wrong (issue 13): changed data or model
on resume, NaN model outputs and data, errors naming the global sample, train-mode models,
terminal escapes in `info`, pickle-free data paths."""

from __future__ import annotations

import json
import os
import pickle
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
from fastattr.errors import AttributionInputError, InputDtypeError, NonFiniteError, RunMismatchError, SourceError
from fastattr.fingerprints import model_fingerprint

pytestmark = pytest.mark.usefixtures("single_thread")


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)


class Tripwire(nn.Module):
    """A small CNN that raises while armed and a sample's first pixel is above 40: a run over
    data with one such sample stops there, leaving the shards before it finished."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed and bool((x[:, 0, 0, 0] > 40).any()):
            raise RuntimeError("tripwire")
        return self.net(x)


def _half_finished_run(tmp_path: Path, data: object, n: int = 40) -> Path:
    """A run of ``data`` (whose sample 25 trips the wire) stopped in its third batch: [0, 20) stored."""
    model = Tripwire()
    model.armed = True
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="tripwire"):
        fastattr.run(model, data, out, target=1, n_steps=4, shard_size=10, examples_per_batch=10, progress=False)
    np.testing.assert_array_equal(fastattr.open(out).field("index"), np.arange(20))
    return out


# -- 1. data fingerprints -------------------------------------------------------------------------


def test_resume_refuses_npy_data_changed_in_the_middle_and_names_the_samples(tmp_path):
    x = images(40)
    x[25, 0, 0, 0] = 50.0
    path = tmp_path / "x.npy"
    np.save(path, x)
    out = _half_finished_run(tmp_path, str(path))
    changed = np.load(path)
    changed[15] += 0.5  # a sample whose results are already stored; first and last unchanged
    np.save(path, changed)
    with pytest.raises(RunMismatchError, match=r"fingerprints\.data\.blocks\.15:16") as info:
        fastattr.run(Tripwire(), str(path), out, target=1, n_steps=4, shard_size=10, examples_per_batch=10, progress=False)
    assert "blocks.0:1" not in str(info.value) and "blocks.39:40" not in str(info.value)
    assert json.loads((out / "manifest.json").read_text())["config"]["fingerprints"]["data"]["kind"] == "full"
    np.save(path, x)  # back as it was: the run resumes and completes
    summary = fastattr.run(Tripwire(), str(path), out, target=1, n_steps=4, shard_size=10, examples_per_batch=10, progress=False)
    assert summary.complete and summary.computed == 20


def test_resume_refuses_changed_hdf5_data_and_labels(tmp_path):
    x = images(40)
    labels = np.arange(40) % 5
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, labels
    spec = f"{tmp_path / 'd.h5'}:x"
    kw = dict(labels=f"{tmp_path / 'd.h5'}:y", target="label", n_steps=4, shard_size=10, progress=False)
    fastattr.run(Tripwire(), spec, tmp_path / "run", **kw)
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f["x"][7, 1, 2, 3] += 1.0
    with pytest.raises(RunMismatchError, match=r"fingerprints\.data\.blocks\.7:8"):
        fastattr.run(Tripwire(), spec, tmp_path / "run", **kw)
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f["x"][7] = x[7]
        f["y"][30] = 4 - labels[30]
    with pytest.raises(RunMismatchError, match=r"fingerprints\.data\.labels_sha256"):
        fastattr.run(Tripwire(), spec, tmp_path / "run", **kw)


def test_dataset_fingerprint_is_a_recorded_strided_sample(tmp_path):
    x = torch.from_numpy(images(300))
    ds = torch.utils.data.TensorDataset(x)
    fp = fastattr.sources.open_source(ds).fingerprint()
    assert fp["kind"] == "strided:64" and fp["count"] == 300 and fp["shapes"] == [[3, 6, 6]] and fp["dtypes"] == ["torch.float32"]
    picked = x.clone()
    picked[299] += 1  # the last item is always in the sample
    assert fastattr.sources.open_source(torch.utils.data.TensorDataset(picked)).fingerprint()["sample_sha256"] != fp["sample_sha256"]
    assert fastattr.sources.open_source(x.numpy()).fingerprint()["kind"] == "full"


# -- 2. model fingerprints ------------------------------------------------------------------------


def test_resume_refuses_the_same_weights_with_other_code(tmp_path):
    x = images(12)
    fastattr.run(Tripwire(nn.Tanh), x, tmp_path / "run", target=1, n_steps=4, progress=False)
    relu = Tripwire(nn.ReLU)
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(), Tripwire(nn.Tanh).state_dict().values()))
    with pytest.raises(RunMismatchError, match=r"fingerprints\.model\.modules"):
        fastattr.run(relu, x, tmp_path / "run", target=1, n_steps=4, progress=False)
    a, b = model_fingerprint(Tripwire(nn.Tanh)), model_fingerprint(relu)
    assert a["parameters"] == b["parameters"] and a["modules"] != b["modules"]


def test_torchscript_and_export_code_is_fingerprinted():
    tanh, relu = Tripwire(nn.Tanh).net.eval(), Tripwire(nn.ReLU).net.eval()
    st, sr = torch.jit.script(tanh), torch.jit.script(relu)
    assert model_fingerprint(st)["code"] != model_fingerprint(sr)["code"]
    x = torch.from_numpy(images(2))
    et, er = (torch.export.export(m, (x,)).module() for m in (tanh, relu))
    ft, fr = model_fingerprint(et), model_fingerprint(er)
    assert ft["parameters"] == fr["parameters"] and ft["code"] != fr["code"]


FINGERPRINT_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from fastattr.fingerprints import model_fingerprint
    import usermodel
    eager = usermodel.Net()
    out = {"eager": model_fingerprint(eager), "script": model_fingerprint(torch.jit.load(sys.argv[1])),
           "export": model_fingerprint(torch.export.load(sys.argv[2]).module())}
    print(json.dumps(out))
    """
)
USER_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return torch.tanh(self.lin(x))
    """
)


def test_model_fingerprint_is_the_same_in_two_processes_and_sees_edited_source(tmp_path):
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    (tmp_path / "fp.py").write_text(FINGERPRINT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "random"}
    save = "import torch, usermodel; m = usermodel.Net().eval(); torch.jit.script(m).save('m.ts'); torch.export.save(torch.export.export(m, (torch.randn(2, 4),)), 'm.pt2')"
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, env=env, check=True, timeout=300)

    def fingerprints() -> dict:
        r = subprocess.run([sys.executable, "fp.py", "m.ts", "m.pt2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first, second = fingerprints(), fingerprints()
    assert first == second
    (tmp_path / "usermodel.py").write_text(USER_MODEL.replace("torch.tanh(", "torch.relu("))  # same class, same weights, other code
    edited = fingerprints()
    assert edited["eager"]["code"] != first["eager"]["code"]
    assert edited["eager"]["parameters"] == first["eager"]["parameters"] and edited["eager"]["modules"] == first["eager"]["modules"]


# -- 3. NaN model outputs -------------------------------------------------------------------------


class NanClassZero(nn.Module):
    """Class 0's output is NaN for samples whose first feature is above 1; the rest is a linear map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        first = torch.where(x[:, :1] > 1.0, torch.full_like(out[:, :1], float("nan")), out[:, :1])
        return torch.cat([first, out[:, 1:]], 1)


def _vectors(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(3).standard_normal((n, 4)).astype(np.float32)
    x[:, 0] = np.clip(x[:, 0], -0.9, 0.9)
    x[[12, 18], 0] = 1.5
    return x, np.array([12, 18])


def test_nan_outputs_with_predicted_target_fail_naming_the_samples(tmp_path):
    x, _ = _vectors()
    with pytest.raises(NonFiniteError, match=r"^sample 12: the model's output is NaN"):  # row 4 of the second batch
        fastattr.run(NanClassZero(), x, tmp_path / "run", n_steps=4, examples_per_batch=8, progress=False)
    with pytest.raises(NonFiniteError, match=r"^samples 12, 18: the model's output is NaN"):
        fastattr.run(NanClassZero(), x, tmp_path / "run", n_steps=4, progress=False)


def test_nan_outputs_with_allow_nonfinite_are_stored_and_counted(tmp_path):
    x, bad = _vectors()
    model = NanClassZero()
    summary = fastattr.run(model, x, tmp_path / "run", n_steps=4, examples_per_batch=8, allow_nonfinite=True, progress=False)
    assert summary.complete
    got = fastattr.open(tmp_path / "run")[:]
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    expected = np.where(np.isnan(out), -np.inf, out).argmax(1)
    np.testing.assert_array_equal(got["target"], expected)
    assert (got["target"][bad] != 0).all()  # never class 0 because its output is NaN
    counts = got["stats"]["nonfinite"]
    assert (counts[bad] > 0).all() and (np.delete(counts, bad) == 0).all()


def test_nan_output_at_a_fixed_target_fails_or_is_stored_as_nan(tmp_path):
    x, bad = _vectors()
    with pytest.raises(NonFiniteError, match=r"^samples 12, 18: non-finite results \(sample 12: output nan"):
        fastattr.run(NanClassZero(), x, tmp_path / "a", target=0, n_steps=4, progress=False)
    fastattr.run(NanClassZero(), x, tmp_path / "b", target=0, n_steps=4, examples_per_batch=8, allow_nonfinite=True, progress=False)
    got = fastattr.open(tmp_path / "b")[:]
    assert np.isnan(got["output"][bad]).all() and np.isnan(got["delta"][bad]).all()
    assert (got["stats"]["nonfinite"][bad] >= 2).all() and (np.delete(got["stats"]["nonfinite"], bad) == 0).all()


# -- 12. bad samples name their global index ------------------------------------------------------


@pytest.mark.parametrize("target", [1, "predicted"])
def test_nan_in_one_sample_names_it_and_allow_nonfinite_stores_it(tmp_path, target):
    x = images(20)
    x[13, 2, 1, 1] = np.nan
    with pytest.raises(AttributionInputError, match=r"^sample 13: input 0 contains NaN"):
        fastattr.run(Tripwire(), x, tmp_path / "a", target=target, n_steps=4, examples_per_batch=8, progress=False)
    summary = fastattr.run(Tripwire(), x, tmp_path / "b", target=target, n_steps=4, examples_per_batch=8, allow_nonfinite=True, progress=False)
    assert summary.complete
    counts = fastattr.open(tmp_path / "b").field("stats/nonfinite")
    assert counts[13] > 0 and (np.delete(counts, 13) == 0).all()


def test_target_out_of_range_names_the_sample(tmp_path):
    x = images(20)
    targets = np.arange(20) % 5
    targets[11] = 7
    with pytest.raises(AttributionInputError, match=r"^sample 11: target 7 is out of range"):
        fastattr.run(Tripwire(), x, tmp_path / "a", target=targets, n_steps=4, examples_per_batch=8, progress=False)


class Ragged(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.zeros(3, 6, 7 if i == 10 else 6), 1


def test_shape_errors_name_the_sample_also_through_a_loader(tmp_path):
    loader = torch.utils.data.DataLoader(Ragged(), batch_size=4)
    with pytest.raises(SourceError, match=r"^sample 10: its shapes \[\(3, 6, 7\)\] differ from sample 8"):
        fastattr.run(Tripwire(), loader, tmp_path / "a", target=1, n_steps=4, examples_per_batch=4, progress=False)


def test_integer_data_is_refused_before_the_model_runs(tmp_path):
    x = np.arange(4 * 3 * 6 * 6).reshape(4, 3, 6, 6)
    model = Tripwire()
    model.armed = True  # an integer batch reaching the model would raise the tripwire's error, not the dtype one
    x[0, 0, 0, 0] = 50
    with pytest.raises(InputDtypeError, match="input 0 of the data has dtype torch.int64.*needs floating point") as info:
        fastattr.run(model, x, tmp_path / "a", progress=False)
    assert isinstance(info.value, TypeError)


# -- 13. eval mode ---------------------------------------------------------------------------------


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.train()


def test_runs_use_eval_mode_and_restore_the_model(tmp_path):
    model, x = bn_model(), images(24)
    model[4].eval()  # a mixed-mode model gets each module's own mode back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastattr.run(model, x, tmp_path / "a", target=1, n_steps=4, examples_per_batch=4, batch_size=8, progress=False)
    fastattr.run(model, x, tmp_path / "b", target=1, n_steps=4, examples_per_batch=24, progress=False)
    a, b = fastattr.open(tmp_path / "a")[:], fastattr.open(tmp_path / "b")[:]
    np.testing.assert_allclose(a["attributions"]["x"], b["attributions"]["x"], rtol=1e-5, atol=1e-7)
    ref = fastattr.IntegratedGradients(bn_model().eval()).attribute(torch.from_numpy(x), target=1, n_steps=4)
    np.testing.assert_allclose(a["attributions"]["x"], ref.numpy(), rtol=1e-4, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["train_mode"] is False


def test_mode_is_restored_after_an_error_and_train_mode_keeps_the_buffers(tmp_path):
    model, x = bn_model(), images(8)
    x[5, 0, 0, 0] = np.nan
    with pytest.raises(AttributionInputError, match="sample 5"):
        fastattr.run(model, x, tmp_path / "a", target=1, n_steps=4, progress=False)
    assert all(m.training for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    fastattr.run(model, images(8), tmp_path / "b", target=1, n_steps=4, train_mode=True, progress=False)
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["config"]["train_mode"] is True
    with pytest.raises(RunMismatchError, match="train_mode"):
        fastattr.run(model, images(8), tmp_path / "b", target=1, n_steps=4, progress=False)


# -- 14. pickle-free data paths ---------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_data_paths_never_unpickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = np.empty(4, dtype=object)
    evil[:] = [_Payload(str(marker))] * 4
    with open(tmp_path / "evil.npy", "wb") as f:
        np.lib.format.write_array(f, evil, allow_pickle=True)
    assert pickle.loads(pickle.dumps(_Payload(str(tmp_path / "probe")))) and (tmp_path / "probe").exists()  # the payload works
    x = images(4)
    for kwargs in ({"data": str(tmp_path / "evil.npy")}, {"data": x, "labels": str(tmp_path / "evil.npy"), "target": "label"},
                   {"data": x, "target": str(tmp_path / "evil.npy")}):  # fmt: skip
        with pytest.raises(SourceError, match="never unpickles"):
            fastattr.run(Tripwire(), out=tmp_path / "r", n_steps=4, progress=False, **kwargs)
    assert not marker.exists()
