"""No host synchronisation per chunk (issue 16: dataset runs at model speed on a GPU).

On CUDA every ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()`` or ``.numpy()`` waits for the
device to drain its queue; one per chunk of rows would leave the GPU idle while Python launches the
next chunk. CI has no GPU, so these tests count those calls on CPU tensors through a
TorchFunctionMode (the same Python code runs on both devices) and check that a call or a dataset
batch makes as many with 64 chunks as with 2: the count may depend on the batch, never on the
number of chunks. fp16 is the one documented exception: its dynamic backward scale checks each
chunk's gradients for overflow (fastattr/engine.py, Engine._grad_chunk).
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import fastattr
from fastattr.engine import Engine

pytestmark = pytest.mark.usefixtures("single_thread")

# Tensor -> Python conversions: on CUDA each one blocks until the device has caught up
SYNCS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"})


class _Syncs(TorchFunctionMode):
    """Counts host-synchronising tensor calls, keyed by (function, fastattr file:line)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCS:
            ours = [f for f in traceback.extract_stack()[:-1] if "/fastattr/" in f.filename]
            self.calls[(name, f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "?")] += 1
        return func(*args, **(kwargs or {}))


def _syncs(fn) -> collections.Counter:
    fn()  # warm: cached quadrature tables and the like are built once per process, not per call
    with _Syncs() as counter:
        fn()
    return counter.calls


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


MODEL = _model()
X = torch.randn(16, 3, 8, 8)
CALLS = {  # rows -> one attribution call; 16 samples x 8 steps/draws = 128 rows: 1 chunk at 256, 64 chunks at 2
    "saliency": lambda rows, p: fastattr.Saliency(MODEL).attribute(X, target=1, max_rows=rows, precision=p),
    "input_x_gradient": lambda rows, p: fastattr.InputXGradient(MODEL).attribute(
        X, target=1, max_rows=rows, precision=p
    ),
    "ig_delta": lambda rows, p: fastattr.IntegratedGradients(MODEL).attribute(
        X, target=torch.arange(16) % 5, n_steps=8, internal_batch_size=rows, return_convergence_delta=True, precision=p
    ),
    "ig_riemann": lambda rows, p: fastattr.IntegratedGradients(MODEL).attribute(
        X, target=2, n_steps=8, method="riemann_right", internal_batch_size=rows, precision=p
    ),
    "smoothgrad_ig": lambda rows, p: fastattr.NoiseTunnel(fastattr.IntegratedGradients(MODEL)).attribute(
        X, target=1, nt_samples=2, n_steps=4, internal_batch_size=rows, precision=p
    ),
    "gradient_shap": lambda rows, p: fastattr.GradientShap(MODEL).attribute(
        X, baselines=torch.zeros(3, 3, 8, 8), target=1, n_samples=8, max_rows=rows, precision=p
    ),
    "layer_ig": lambda rows, p: fastattr.LayerIntegratedGradients(MODEL, MODEL[0]).attribute(
        X, target=1, n_steps=8, internal_batch_size=rows, precision=p
    ),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(CALLS))
def test_a_call_syncs_the_same_with_2_or_64_chunks(method, precision):
    few, many = (_syncs(lambda rows=rows: CALLS[method](rows, precision)) for rows in (256, 2))
    assert sum(many.values()) == sum(few.values()), (
        f"per-chunk host syncs (function, site): few chunks {few}, many chunks {many}"
    )
    assert sum(few.values()) <= 8, few  # input checks and the step weights: a handful per call


def test_the_counter_sees_a_sync_per_chunk(monkeypatch):
    """The check above is not vacuous: a per-chunk .item() in the engine shows up as a difference."""
    chunk = Engine._grad_chunk

    def syncing(self, *args, **kwargs):
        grads, selected = chunk(self, *args, **kwargs)
        selected.sum().item()
        return grads, selected

    monkeypatch.setattr(Engine, "_grad_chunk", syncing)
    few, many = (_syncs(lambda rows=rows: CALLS["ig_delta"](rows, "fp32")) for rows in (256, 2))
    assert sum(many.values()) - sum(few.values()) == 64 - 1


def test_fp16_checks_each_chunk_for_overflow():
    """The documented exception: fp16's dynamic backward scale reads each chunk's isfinite."""
    few, many = (_syncs(lambda rows=rows: CALLS["ig_delta"](rows, "fp16")) for rows in (256, 2))
    assert sum(many.values()) > sum(few.values())


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_a_dataset_batch_syncs_the_same_with_2_or_32_chunks(tmp_path, method):
    """fastattr.run: a batch's host syncs (input checks, target, the host copy of its results)
    do not grow with its chunks. IG at 2 vs 32 steps over one batch of 32 samples: 64 vs 1024
    rows, 2 vs 32 chunks of the tuner's first 32 rows. Saliency: 32 vs 512 samples in batches of 32."""
    data = torch.randn(512, 3, 8, 8)
    counts = []
    for i, (n, steps) in enumerate(((32, 2), (32, 32)) if method == "integrated_gradients" else ((32, 1), (512, 1))):
        out = tmp_path / f"run{i}"
        calls = _syncs(
            lambda n=n, steps=steps, out=out: fastattr.run(
                MODEL, data[:n], str(out), method, n_steps=steps, batch_size=32, target="predicted", progress=False
            )
        )
        batches = n // 32
        counts.append((sum(calls.values()) / batches, calls))
    (few, few_calls), (many, many_calls) = counts
    assert many <= few, f"host syncs per batch grew with the chunks: {few_calls} vs {many_calls}"
