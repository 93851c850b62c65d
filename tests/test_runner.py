"""Dataset-wide runs: sources, targets, equality with the in-memory API, resume, crashes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import fastattr
from fastattr.sources import SourceError, open_source

pytestmark = pytest.mark.usefixtures("single_thread")


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)


class LabelledDataset(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, labels: np.ndarray) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.labels[i])


def test_run_equals_in_memory_api(tmp_path):
    model, x = small_cnn(), images(53)
    summary = fastattr.run(model, x, tmp_path / "run", target=2, n_steps=12, shard_size=20, examples_per_batch=7, progress=False)
    assert summary.complete and summary.computed == 53
    ref, delta = fastattr.IntegratedGradients(model).attribute(torch.from_numpy(x), target=2, n_steps=12, return_convergence_delta=True)
    store = fastattr.open(tmp_path / "run")
    assert len(store) == 53
    got = store[0:53]
    np.testing.assert_allclose(got["attributions"]["x"], ref.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["delta"], delta.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got["index"], np.arange(53))
    np.testing.assert_array_equal(got["target"], np.full(53, 2))
    assert (got["n_steps"] == 12).all()
    with torch.no_grad():
        out = model(torch.from_numpy(x))[:, 2].numpy()
    np.testing.assert_allclose(got["output"], out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["stats"]["sum"], ref.reshape(53, -1).sum(1).numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_gradient_methods_run(tmp_path, method):
    model, x = small_cnn(), images(10)
    fastattr.run(model, x, tmp_path / method, method=method, target=1, progress=False)
    ref = getattr(fastattr, "Saliency" if method == "saliency" else "InputXGradient")(model).attribute(torch.from_numpy(x), target=1)
    got = fastattr.open(tmp_path / method)[:]
    np.testing.assert_allclose(got["attributions"]["x"], ref.numpy(), rtol=1e-5, atol=1e-7)
    assert np.isnan(got["delta"]).all()


def test_targets_label_predicted_and_array(tmp_path):
    model, x = small_cnn(), images(17)
    labels = np.arange(17) % 5
    fastattr.run(model, LabelledDataset(x, labels), tmp_path / "label", target="label", n_steps=4, progress=False)
    assert (fastattr.open(tmp_path / "label").field("target") == labels).all()
    fastattr.run(model, x, tmp_path / "pred", target="predicted", n_steps=4, progress=False)
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    assert (fastattr.open(tmp_path / "pred").field("target") == pred).all()
    per_sample = (np.arange(17) * 3) % 5
    fastattr.run(model, x, tmp_path / "arr", target=per_sample, n_steps=4, progress=False)
    assert (fastattr.open(tmp_path / "arr").field("target") == per_sample).all()


def test_sources_npy_h5_dataloader(tmp_path):
    model, x = small_cnn(), images(12)
    np.save(tmp_path / "x.npy", x)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"] = x
        f["labels"] = np.arange(12) % 5
    loader = torch.utils.data.DataLoader(LabelledDataset(x, np.arange(12) % 5), batch_size=5)
    runs = {
        "npy": (str(tmp_path / "x.npy"), {}),
        "h5": (f"{tmp_path / 'd.h5'}:images", {"labels": f"{tmp_path / 'd.h5'}:labels"}),
        "loader": (loader, {}),
    }
    results = {}
    for name, (data, kw) in runs.items():
        fastattr.run(model, data, tmp_path / name, target="label" if name != "npy" else 0, n_steps=4, progress=False, **kw)
        results[name] = fastattr.open(tmp_path / name)[:]["attributions"]["x"]
    ref0 = fastattr.IntegratedGradients(model).attribute(torch.from_numpy(x), target=0, n_steps=4).numpy()
    np.testing.assert_allclose(results["npy"], ref0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results["h5"], results["loader"], rtol=1e-5, atol=1e-7)


def test_shuffling_loader_and_bad_sources_are_refused():
    with pytest.raises(SourceError, match="shuffle"):
        open_source(torch.utils.data.DataLoader(LabelledDataset(images(4), np.zeros(4)), shuffle=True))
    with pytest.raises(SourceError, match="no such file"):
        open_source("missing.npy")
    with pytest.raises(SourceError, match="unsupported"):
        open_source(object())


def test_resume_skips_finished_and_complete_run_is_not_recomputed(tmp_path):
    model, x = small_cnn(), images(30)
    fastattr.run(model, x, tmp_path / "r", target=1, n_steps=4, shard_size=10, progress=False)
    again = fastattr.run(model, x, tmp_path / "r", target=1, n_steps=4, shard_size=10, progress=False)
    assert again.computed == 0 and again.complete


def test_resume_into_a_different_config_is_refused(tmp_path):
    from fastattr.store import RunMismatchError

    model, x = small_cnn(), images(8)
    fastattr.run(model, x, tmp_path / "r", target=1, n_steps=4, progress=False)
    with pytest.raises(RunMismatchError):
        fastattr.run(model, x, tmp_path / "r", target=1, n_steps=8, progress=False)
    with pytest.raises(RunMismatchError):
        fastattr.run(small_cnn(seed=5), x, tmp_path / "r", target=1, n_steps=4, progress=False)
    fastattr.run(model, x, tmp_path / "r", target=1, n_steps=8, overwrite=True, progress=False)


class ShapeChangesAt(torch.utils.data.Dataset):
    def __init__(self, n: int, bad: int) -> None:
        self.x, self.bad = images(n), bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.zeros(3, 5, 5) if i == self.bad else torch.from_numpy(self.x[i])


def test_inconsistent_shapes_name_the_sample_and_keep_finished_work(tmp_path):
    model = small_cnn()
    with pytest.raises(SourceError, match="sample 23"):
        fastattr.run(model, ShapeChangesAt(40, bad=23), tmp_path / "r", target=0, n_steps=4, shard_size=5, examples_per_batch=5, progress=False)
    store = fastattr.open(tmp_path / "r")
    assert len(store) == 20  # every batch before the bad one was finalized
    np.testing.assert_array_equal(store.indices, np.arange(20))


def test_bad_arguments(tmp_path):
    model, x = small_cnn(), images(4)
    with pytest.raises(ValueError, match="unknown method"):
        fastattr.run(model, x, tmp_path / "a", method="lime")
    with pytest.raises(ValueError, match="target"):
        fastattr.run(model, x, tmp_path / "b", target="biggest")
    with pytest.raises(SourceError, match="no labels"):
        fastattr.run(model, x, tmp_path / "c", target="label")
    with pytest.raises(ValueError, match="per-sample target array has shape"):
        fastattr.run(model, x, tmp_path / "d", target=np.zeros(3, dtype=int))


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from torch import nn
    import fastattr
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()
    x = np.random.default_rng(1).standard_normal((4000, 3, 6, 6)).astype(np.float32)
    fastattr.run(model, x, sys.argv[1], target=3, n_steps=8, shard_size=16, examples_per_batch=8, progress=False)
    print("DONE")
    """
)


def test_sigkill_at_random_moments_then_resume_gives_each_sample_once(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(CRASH_SCRIPT)
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.5, 4.0))  # the import takes ~1.5 s, the whole job ~10 s
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if run_dir.exists():
            listed = fastattr.open(run_dir)
            assert not any(s["file"].endswith(".partial") for s in listed.metadata["shards"])
    assert kills >= 1
    done = subprocess.run([sys.executable, str(script), str(run_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    store = fastattr.open(run_dir)
    np.testing.assert_array_equal(store.indices, np.arange(4000))  # every sample exactly once
    assert not list(Path(run_dir).glob("*.partial"))
    torch.manual_seed(0)
    model = small_cnn()
    x = np.random.default_rng(1).standard_normal((4000, 3, 6, 6)).astype(np.float32)
    ref = fastattr.IntegratedGradients(model).attribute(torch.from_numpy(x), target=3, n_steps=8).numpy()
    np.testing.assert_allclose(store[0:4000]["attributions"]["x"], ref, rtol=1e-5, atol=1e-6)
    report = fastattr.store.verify_run(run_dir)
    assert report.ok, report.problems


def test_out_of_memory_halves_rows_and_retries_the_same_samples():
    from fastattr.run_loop import attribute_with_retry as _attribute_with_retry
    from fastattr.run_methods import Batch, MethodPlan

    class FlakyIG:
        """Raises CUDA OOM while more than 40 rows per forward are allowed."""

        def __init__(self) -> None:
            self.calls: list[int | None] = []

        def attribute_batch(self, inputs, baselines, target, args, n_steps, rule, max_rows, with_delta, **kw):
            self.calls.append(max_rows)
            if max_rows is None or max_rows > 40:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return ("result", inputs.shape[0])

    from fastattr import budget

    x = torch.randn(10, 3)
    ig = FlakyIG()
    plan = MethodPlan("integrated_gradients", {}, lambda b: ig.attribute_batch(b.inputs[0], None, 0, None, 16, "gausslegendre", b.max_rows, True), 16)
    # sizes remembered on the batch's device ran out of memory: forgotten, so a later call (the
    # in-memory API has no retry) measures again instead of starting at the size that failed
    budget._settled[("model", "fp32", "cpu", None)] = 4096
    budget._settled[("model", "fp32", "cuda:1", None)] = 4096
    try:
        res, rows = _attribute_with_retry(plan, Batch((x,), 0, None, 0, 10, None))
        assert ("model", "fp32", "cpu", None) not in budget._settled and budget._settled[("model", "fp32", "cuda:1", None)] == 4096
    finally:
        budget._settled.pop(("model", "fp32", "cuda:1", None), None)
    assert res == ("result", 10)  # the same 10 samples, once
    assert ig.calls == [None, 80, 40] and rows == 40  # 10 x 16 rows -> halved until it fits


def test_out_of_memory_at_one_row_is_raised():
    from fastattr.run_loop import attribute_with_retry as _attribute_with_retry
    from fastattr.run_methods import Batch, MethodPlan

    class AlwaysOOM:
        def attribute_batch(self, *a, **kw):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    plan = MethodPlan("saliency", {}, AlwaysOOM().attribute_batch, 1)
    with pytest.raises(torch.OutOfMemoryError):
        _attribute_with_retry(plan, Batch((torch.randn(1, 3),), 0, None, 0, 1, None))


def test_batchnorm_model_multi_input_and_float64_data(tmp_path):
    """0-d buffers (BatchNorm's counter) fingerprint fine; tuple data; float64 data meets a float32 model."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.b = nn.Linear(3, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x1, x2):
            return self.head(self.a(x1) + self.b(x2))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((9, 4)), rng.standard_normal((9, 3)).astype(np.float32)
    fastattr.run(model, (x1, x2), tmp_path / "r", target=1, n_steps=6, progress=False)
    got = fastattr.open(tmp_path / "r")[:]
    ref = fastattr.IntegratedGradients(model).attribute((torch.from_numpy(x1).float(), torch.from_numpy(x2)), target=1, n_steps=6)
    np.testing.assert_allclose(got["attributions"]["input_0"], ref[0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["attributions"]["input_1"], ref[1].numpy(), rtol=1e-5, atol=1e-7)


def test_predicted_target_for_single_and_multidimensional_outputs(tmp_path):
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(5, 1)).eval()
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    fastattr.run(single, x, tmp_path / "single", n_steps=4, progress=False)  # target="predicted" by default
    assert (fastattr.open(tmp_path / "single").field("target") == -1).all()  # one output: nothing to pick

    grid = nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (2, 3))).eval()
    fastattr.run(grid, x, tmp_path / "grid", n_steps=4, progress=False)
    with torch.no_grad():
        flat = grid(torch.from_numpy(x)).reshape(6, -1).argmax(1)
    expected = np.stack([flat.numpy() // 3, flat.numpy() % 3], axis=1)
    np.testing.assert_array_equal(fastattr.open(tmp_path / "grid").field("target"), expected)

    per_sample = np.stack([np.arange(6) % 2, np.arange(6) % 3], axis=1)
    fastattr.run(grid, x, tmp_path / "pairs", target=per_sample, n_steps=4, progress=False)
    np.testing.assert_array_equal(fastattr.open(tmp_path / "pairs").field("target"), per_sample)
    fastattr.run(grid, x, tmp_path / "tuple", target=(1, 2), n_steps=4, progress=False)
    assert (fastattr.open(tmp_path / "tuple").field("target") == [1, 2]).all()
    with pytest.raises(ValueError, match="integers"):
        fastattr.run(grid, x, tmp_path / "float", target=np.zeros(6), n_steps=4, progress=False)


def test_per_sample_baselines_are_sliced_per_batch(tmp_path):
    model, x = small_cnn(), images(11)
    base = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    fastattr.run(model, x, tmp_path / "r", target=0, baselines=base, n_steps=6, examples_per_batch=4, progress=False)
    ref = fastattr.IntegratedGradients(model).attribute(torch.from_numpy(x), baselines=torch.from_numpy(base), target=0, n_steps=6)
    np.testing.assert_allclose(fastattr.open(tmp_path / "r")[:]["attributions"]["x"], ref.numpy(), rtol=1e-5, atol=1e-7)


def test_labels_argument_rules(tmp_path):
    model, x = small_cnn(), images(7)
    with pytest.raises(SourceError, match="labels= goes with array"):
        fastattr.run(model, LabelledDataset(x, np.zeros(7)), tmp_path / "a", labels=np.zeros(7), target="label")
    with h5py.File(tmp_path / "l.h5", "w") as f:
        f["y"] = np.arange(7) % 5
    fastattr.run(model, x, tmp_path / "b", labels=f"{tmp_path / 'l.h5'}:y", target="label", n_steps=4, progress=False)
    assert (fastattr.open(tmp_path / "b").field("target") == np.arange(7) % 5).all()


def test_directory_is_released_when_a_run_fails_early(tmp_path):
    model, x = small_cnn(), images(5)
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the batch loop
        fastattr.run(model, x, tmp_path / "r", target=99, n_steps=4, progress=False)  # target out of range
    fastattr.run(model, x, tmp_path / "r", target=1, n_steps=4, progress=False, overwrite=True)  # not "in use"
    assert len(fastattr.open(tmp_path / "r")) == 5


def test_loader_collate_fn_applies_and_negative_labels_are_refused(tmp_path):
    model, x = small_cnn(), images(9)
    labels = np.arange(9) % 5

    def collate(items):  # a transform done at collation time must reach the model
        xs, ys = torch.utils.data.default_collate(items)
        return xs * 2.0, ys

    loader = torch.utils.data.DataLoader(LabelledDataset(x, labels), batch_size=4, collate_fn=collate)
    fastattr.run(model, loader, tmp_path / "r", target="label", n_steps=4, progress=False)
    ref = fastattr.IntegratedGradients(model).attribute(torch.from_numpy(x) * 2.0, target=torch.from_numpy(labels), n_steps=4)
    np.testing.assert_allclose(fastattr.open(tmp_path / "r")[:]["attributions"]["x"], ref.numpy(), rtol=1e-5, atol=1e-7)
    bad = labels.copy()
    bad[6] = -1
    with pytest.raises(SourceError, match="sample 6 has label -1"):
        fastattr.run(model, LabelledDataset(x, bad), tmp_path / "neg", target="label", n_steps=4, progress=False)


class WaitsForTheWriter(nn.Module):
    """Saliency's one forward per batch; on the second batch it waits (at most 20 s) until the first
    batch's shard is listed in the manifest, and records whether it was."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
        self.run_dir, self.calls, self.seen = run_dir, 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (self.run_dir / "shard-00000.h5").exists():
                time.sleep(0.01)
            self.seen = (self.run_dir / "shard-00000.h5").exists()
        return self.net(x)


def test_on_cpu_each_batch_is_written_while_the_next_computes(tmp_path):
    # before: a batch was handed to the writer only after the next one had been computed (the CUDA
    # pattern, for asynchronous copies), so a run of two batches wrote nothing while computing
    model = WaitsForTheWriter(tmp_path / "run")
    x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    fastattr.run(model, x, tmp_path / "run", "saliency", target=0, examples_per_batch=4, shard_size=4, progress=False)
    assert model.calls == 2 and model.seen is True
    assert fastattr.store.verify_run(tmp_path / "run").ok
