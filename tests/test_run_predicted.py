"""target="predicted" in a dataset run is taken from the method's own forward (Saliency and
InputXGradient: the gradient pass; IntegratedGradients: the fp32 F(x) pass of its delta) instead of
a separate no-grad forward of the batch. Same targets, stored fields, errors and non-finite counts
as the separate forward (run_inputs.PredictedTarget.full, still used by every other method)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fastattr
from fastattr.errors import NonFiniteError
from fastattr.run_inputs import Targets


class Counting(nn.Module):
    """A small CNN returning a dict (attributed through output="logits"), scaled per sample by a
    keyword argument, with NaN outputs where input channel 0 at (0, 0) exceeds 1.5 (nan=True); it
    counts the rows its forward sees."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 5)
        self.nan = nan
        self.rows = 0

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.rows += x.shape[0]
        y = self.head(torch.relu(self.conv(x)).mean((2, 3)))
        if scale is not None:
            y = y * scale[:, None]
        if self.nan:
            y = torch.where(x[:, :1, 0, 0] > 1.5, torch.full_like(y, float("nan")), y)
        return {"logits": y, "other": -y}


def images(n: int = 23) -> np.ndarray:
    x = np.random.default_rng(5).standard_normal((n, 3, 8, 8)).astype(np.float32)
    x[:, 0, 0, 0] = np.clip(x[:, 0, 0, 0], -1.0, 1.0)
    x[[4, 13, 14], 0, 0, 0] = 2.0  # NaN outputs for Counting(nan=True): rows in different chunks of one batch
    return x


METHODS = [("saliency", {}), ("input_x_gradient", {}), ("ig", {"n_steps": 4}), ("ig", {"n_steps": 4, "rule": "riemann_right"})]


def run(tmp_path, name, model, x, method, monkeypatch=None, **kw):
    opts = dict(output="logits", forward_kwargs={"scale": np.linspace(0.5, 2.0, len(x)).astype(np.float32)},
                examples_per_batch=16, batch_size=3, progress=False)  # fmt: skip
    fastattr.run(model, x, tmp_path / name, method, **{**opts, **kw})
    return fastattr.open(tmp_path / name)[:]


def separate_forward(monkeypatch):
    """The path every method had before: target="predicted" from a no-grad forward of the batch."""
    plain = Targets.for_batch
    monkeypatch.setattr(Targets, "for_batch", lambda self, *a, fused=False, **k: plain(self, *a, **k))


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            same(a[k], b[k])
        else:
            assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k


@pytest.mark.parametrize("method,kw", METHODS)
@pytest.mark.parametrize("nan", [False, True])
def test_fused_predicted_target_stores_exactly_what_the_separate_forward_did(tmp_path, monkeypatch, method, kw, nan):
    # output= selection, per-sample forward_kwargs, chunks of 3 rows cutting the batches, NaN rows
    # (allow_nonfinite: the largest non-NaN output, counted in stats/nonfinite) in several chunks
    x = images()
    fused = run(tmp_path, "fused", Counting(nan), x, method, allow_nonfinite=nan, **kw)
    separate_forward(monkeypatch)
    old = run(tmp_path, "old", Counting(nan), x, method, allow_nonfinite=nan, **kw)
    same(fused, old)
    if nan:
        assert (fused["stats"]["nonfinite"][[4, 13, 14]] > 0).all() and (np.delete(fused["stats"]["nonfinite"], [4, 13, 14]) == 0).all()
        assert (fused["target"][[4, 13, 14]] == 0).all()  # every output NaN: the largest non-NaN is none, argmax of -inf
    with torch.no_grad():
        scale = torch.linspace(0.5, 2.0, len(x))
        want = Counting()(torch.from_numpy(x), scale=scale)["logits"].argmax(1).numpy()
    keep = np.setdiff1d(np.arange(len(x)), [4, 13, 14] if nan else [])
    np.testing.assert_array_equal(fused["target"][keep], want[keep])


@pytest.mark.parametrize("method,kw,rows_per_sample", [("saliency", {}, 1), ("input_x_gradient", {}, 1), ("ig", {"n_steps": 4}, 4 + 2)])
def test_predicted_target_costs_no_forward_of_its_own(tmp_path, method, kw, rows_per_sample):
    # before: every sample went through the model once more for its target (rows_per_sample + 1)
    x = images(20)
    model = Counting()
    fastattr.run(model, x, tmp_path / "run", method, progress=False, output="logits", **kw)
    assert model.rows == rows_per_sample * len(x)


def test_fused_predicted_target_with_nan_names_every_sample_of_the_batch(tmp_path):
    # the first chunk (3 rows) that meets a NaN output stops the run; the message names every such
    # sample of the batch, as the batch's own forward did
    x = images()
    with pytest.raises(NonFiniteError, match=r"^samples 4, 13, 14: the model's output is NaN or inf, so target='predicted'"):
        run(tmp_path, "a", Counting(nan=True), x, "saliency", examples_per_batch=23)
    with pytest.raises(NonFiniteError, match=r"^sample 4: the model's output is NaN or inf"):
        run(tmp_path, "b", Counting(nan=True), x, "saliency", examples_per_batch=8)
    with pytest.raises(NonFiniteError, match=r"^samples 4, 13, 14: the model's output is NaN or inf"):
        run(tmp_path, "c", Counting(nan=True), x, "ig", n_steps=4, examples_per_batch=23)


def test_mixed_precision_keeps_the_separate_fp32_forward(tmp_path, monkeypatch):
    # bf16 gradient passes run under autocast: the target still comes from a plain forward
    x = images()
    fused = run(tmp_path, "fused", Counting(), x, "saliency", precision="bf16")
    separate_forward(monkeypatch)
    same(fused, run(tmp_path, "old", Counting(), x, "saliency", precision="bf16"))


class Shaped(nn.Module):
    """Outputs of shape (B, 3, 4) (a target is a pair of indices) or (B,) (one output per example:
    no target to pick), scaled per sample by a keyword argument."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.head, self.kind = nn.Conv2d(3, 4, 3), nn.Linear(4, 12), kind

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.conv(x)).mean((2, 3))) * scale[:, None]
        return y.view(-1, 3, 4) if self.kind == "grid" else y[:, 0]


@pytest.mark.parametrize("kind", ["grid", "one"])
@pytest.mark.parametrize(
    "method,kw", [("saliency", {}), ("ig", {"n_steps": 3, "rule": "riemann_left"}), ("ig", {"n_steps": 3, "rule": "riemann_middle"}),
                  ("ig", {"n_steps": 3, "rule": "riemann_trapezoid"})],  # fmt: skip
)
@pytest.mark.parametrize("rows,per_batch", [(1, 7), (2, 5)])
def test_fused_predicted_target_with_multi_dim_or_single_outputs(tmp_path, monkeypatch, kind, method, kw, rows, per_batch):
    # chunks of 1 or 2 rows (an IG chunk holds x rows and x0 / path rows), batches not dividing the data
    x = images()
    opts = dict(batch_size=rows, examples_per_batch=per_batch, output=None, **kw)
    fused = run(tmp_path, "fused", Shaped(kind), x, method, **opts)
    separate_forward(monkeypatch)
    same(fused, run(tmp_path, "old", Shaped(kind), x, method, **opts))
    if kind == "grid":
        with torch.no_grad():
            out = Shaped(kind)(torch.from_numpy(x), torch.linspace(0.5, 2.0, len(x))).reshape(len(x), -1).argmax(1)
        np.testing.assert_array_equal(fused["target"], torch.stack([out // 4, out % 4], 1).numpy())
    else:
        assert (fused["target"] == -1).all()  # nothing picked, as before


def test_fused_predicted_target_on_a_compiled_model_with_padded_chunks(tmp_path, monkeypatch):
    # a compiled model's short chunks are padded with copies of a row: those rows never resolve a
    # target nor count as non-finite (NaN rows 4, 13, 14 under allow_nonfinite)
    x = images()
    model = torch.compile(Counting(nan=True).eval(), backend="eager", dynamic=False)
    opts = dict(batch_size=4, examples_per_batch=7, allow_nonfinite=True)
    for method, kw in (("saliency", {}), ("ig", {"n_steps": 3})):
        fused = run(tmp_path, f"fused-{method}", model, x, method, **opts, **kw)
        with monkeypatch.context() as m:
            separate_forward(m)
            same(fused, run(tmp_path, f"old-{method}", model, x, method, **opts, **kw))
        assert (fused["stats"]["nonfinite"][[4, 13, 14]] > 0).all() and (np.delete(fused["stats"]["nonfinite"], [4, 13, 14]) == 0).all()
