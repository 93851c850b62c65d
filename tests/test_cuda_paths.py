"""The code paths a CUDA device takes, driven on the CPU where they can be.

On CUDA every public method dispatches its reductions to the Triton kernels (kernels.resolve_backend
"auto"), whose launchers demand dense, same-device tensors of the dtypes they accept, where the torch
reference takes anything. Here FASTATTR_KERNELS=triton sends each call site through those launchers
on CPU tensors, in the Triton interpreter, and the results must equal the torch path's: a call site
that hands a kernel a strided view or an unsupported dtype fails here, not on the next GPU run.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from models import CNN, MLP, TwoInput, assert_attr_close
from torch import nn

import fastattr

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def triton_backend(monkeypatch, triton_interpreter):
    """FASTATTR_KERNELS=triton, the interpreter on CPU; yields a function that runs ``fn`` on both backends."""

    def both(fn):
        from fastattr import kernels

        calls = []
        real = kernels._triton_op
        monkeypatch.setattr(kernels, "_triton_op", lambda name: calls.append(name) or real(name))
        monkeypatch.setenv("FASTATTR_KERNELS", "torch")
        ref = fn()
        assert not calls
        monkeypatch.setenv("FASTATTR_KERNELS", "triton")
        got = fn()
        assert calls, "nothing went through a Triton launcher"
        return got, ref, set(calls)

    return both


def _cnn_inputs(n=3, channels_last=False):
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rule", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_through_the_kernels(triton_backend, rule, channels_last):
    model, x = CNN().eval(), _cnn_inputs(channels_last=channels_last)
    # max_rows below the batch: chunks of one step (the engine's one-step path) and of several
    for rows in (2, 7):
        (got, gd), (ref, rd), ops = triton_backend(
            lambda rows=rows: fastattr.IntegratedGradients(model).attribute(
                x, target=1, n_steps=5, method=rule, internal_batch_size=rows, return_convergence_delta=True
            )
        )
        assert {"path_accumulate", "finalize"} <= ops
        assert_attr_close(got, ref)
        torch.testing.assert_close(gd, rd, rtol=1e-4, atol=1e-5)


def test_two_inputs_saliency_and_input_x_gradient_through_the_kernels(triton_backend):
    model = TwoInput().eval()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, generator=g), torch.randn(4, 2, 4, generator=g))
    got, ref, _ = triton_backend(lambda: fastattr.IntegratedGradients(model).attribute(x, target=0, n_steps=4))
    assert_attr_close(got, ref)
    for cls in (fastattr.Saliency, fastattr.InputXGradient):
        got, ref, _ = triton_backend(lambda cls=cls: cls(model).attribute(x, target=2))
        assert_attr_close(got, ref)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_through_the_kernels(triton_backend, nt_type):
    model, x = MLP().eval(), torch.randn(3, 12, generator=torch.Generator().manual_seed(4))
    got, ref, ops = triton_backend(
        lambda: fastattr.NoiseTunnel(fastattr.IntegratedGradients(model)).attribute(
            x, nt_type=nt_type, nt_samples=4, stdevs=0.2, target=0, n_steps=3, seed=0
        )
    )
    assert_attr_close(got, ref, rtol=1e-4, atol=1e-5)


def test_gradient_shap_through_the_kernels(triton_backend):
    model, x = CNN().eval(), _cnn_inputs()
    refs = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    got, ref, ops = triton_backend(lambda: fastattr.GradientShap(model).attribute(x, refs, n_samples=4, stdevs=0.1, target=2, seed=0))
    assert_attr_close(got, ref, rtol=1e-4, atol=1e-5)


def test_layer_methods_through_the_kernels(triton_backend):
    model, x = MLP().eval(), torch.randn(3, 12, generator=torch.Generator().manual_seed(6))
    layer = model.net[1]
    got, ref, _ = triton_backend(lambda: fastattr.LayerIntegratedGradients(model, layer).attribute(x, target=1, n_steps=4))
    assert_attr_close(got, ref)
    got, ref, ops = triton_backend(lambda: fastattr.LayerIntegratedGradients(model, layer).attribute(x, target=1, n_steps=4, reduce="l2"))
    assert "channel_reduce" in ops and got.shape == (3,)
    assert_attr_close(got, ref)


def test_dataset_run_with_device_reductions_through_the_kernels(triton_backend, tmp_path):
    """fastattr.run's device-side storage form (channel_reduce + float16, fastattr/run_reduce.py) as CUDA makes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()
    data = np.random.default_rng(1).standard_normal((6, 3, 5, 5)).astype(np.float32)
    runs = iter(("torch", "triton"))

    def run():
        out = str(tmp_path / next(runs))
        fastattr.run(model, data, out, target=2, n_steps=4, channel_reduce="l2", storage_dtype="float16", examples_per_batch=4, progress=False)
        with fastattr.open(out, dtype="float32") as store:
            return store[:]["attributions"]["x"]

    got, ref, ops = triton_backend(run)
    assert "channel_reduce" in ops and got.shape == (6, 5, 5)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-6)  # float16 storage: a last-bit fp32 difference may round apart


def test_prefetch_pins_only_host_rows():
    """On CUDA the prefetch thread pins what the source reads (run_loop._prefetch, pin=True); rows that
    are not in host memory (a CUDA tensor passed as the data) cannot be pinned and are passed on as they
    are. Meta tensors stand in for device tensors: pin_memory() refuses both alike ("only dense CPU
    tensors can be pinned"); the old loop pinned every input and the run failed before its first batch."""
    from fastattr.run_loop import _prefetch
    from fastattr.sources import Source

    class DeviceRows(Source):
        def __len__(self) -> int:
            return 5

        def _read(self, start, stop):
            return (torch.zeros(stop - start, 3, device="meta"),), torch.arange(start, stop)

    got = list(_prefetch(DeviceRows(), [(0, 2), (2, 5)], pin=True))
    assert [(start, stop) for start, stop, _, _ in got] == [(0, 2), (2, 5)]
    assert all(xs[0].is_meta and xs[0].shape == (stop - start, 3) for start, stop, xs, _ in got)


def test_more_call_sites_through_the_kernels(triton_backend):
    """Noise tunnel over a channels-last CNN, adaptive steps, pooled layer activations."""
    model, x = CNN().eval(), _cnn_inputs(channels_last=True)
    got, ref, _ = triton_backend(
        lambda: fastattr.NoiseTunnel(fastattr.IntegratedGradients(model)).attribute(
            x, nt_type="smoothgrad_sq", nt_samples=3, stdevs=0.1, target=0, n_steps=3, seed=1
        )
    )
    assert_attr_close(got, ref, rtol=1e-4, atol=1e-5)
    got, ref, _ = triton_backend(lambda: fastattr.IntegratedGradients(model).attribute(x, target=3, n_steps="auto"))
    assert_attr_close(got, ref, rtol=1e-4, atol=1e-5)
    for pool in ("mean", "l2"):
        res, ref, ops = triton_backend(lambda pool=pool: fastattr.LayerActivation(model, model.conv2).attribute_batch(x, pool=pool))
        assert "channel_reduce" in ops
        assert_attr_close(tuple(res.attributions), tuple(ref.attributions))


def test_tf32_set_through_the_fp32_precision_api():
    """torch >= 2.9 recommends torch.backends.cuda.matmul.fp32_precision = "tf32" for TF32 on a GPU; after it,
    reading the legacy allow_tf32 flag raises (torch refuses mixed APIs), which made every call fail in
    Precision.flags. The policy now applies through that API and the caller's settings come back. In a
    child process: the setting is process-wide."""
    import subprocess
    import textwrap

    code = textwrap.dedent(
        """
        import torch, fastattr
        m, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        m.fp32_precision = "tf32"
        seen = []
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 3)
            def forward(self, x):
                if x.requires_grad:
                    seen.append((m.fp32_precision, conv.fp32_precision))
                return self.fc(x)
        x = torch.randn(2, 4)
        for p in ("fp32", "tf32"):
            fastattr.IntegratedGradients(Net()).attribute(x, target=0, n_steps=2, precision=p)
        assert seen[0] == ("ieee", "ieee") and seen[-1] == ("tf32", "tf32"), seen
        assert (m.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_out_of_memory_in_the_trim_check_is_not_a_padding_verdict():
    """CUDA out-of-memory is a RuntimeError; the trim_padding check (layer_methods._check_trim) took it for
    "the model failed on trimmed inputs" (PaddingNotIgnoredError, or a silent fall back to the longer
    full-length pass). It propagates now, as everywhere else (a dataset run halves its rows on it)."""
    from token_models import TokenClassifier, token_batch

    class OOMWhenCut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = TokenClassifier()

        def forward(self, ids, mask):
            if ids.shape[1] < 12 and not torch.is_grad_enabled():
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.model(ids, mask)

    net = OOMWhenCut()
    ids, mask, lengths = token_batch(6, 12, seed=5)
    lig = fastattr.LayerIntegratedGradients(net, net.model.embed)
    with pytest.raises(torch.OutOfMemoryError):
        lig.attribute_batch(ids, None, 0, (mask,), n_steps=4, lengths=lengths, trim_padding=True)


def test_host_copies_of_the_cuda_branch_give_the_same_block(monkeypatch, tmp_path):
    """run_blocks.to_host on a CUDA device: pinned host buffers filled by non-blocking copies, one event
    recorded on the device's stream after them, and write_block waiting on it before reading. Run here
    with the CUDA calls stood in for (pinned allocation -> plain host memory, a recording event), so the
    branch's bookkeeping (every field copied, the float16 storage form's counts, the event) is exercised
    end to end: the block stored equals the CPU branch's."""
    from fastattr import run_blocks
    from fastattr.run_reduce import StoredForm
    from fastattr.store import RunWriter, open_run

    model, x = CNN().eval(), _cnn_inputs(4)
    res = fastattr.IntegratedGradients(model).attribute_batch(x, target=1, n_steps=4)
    form = StoredForm("sum", float16=True)
    events, pinned = [], []

    class Event:
        def record(self, stream=None):
            events.append(("record", stream, len(pinned)))

        def synchronize(self):
            events.append(("synchronize",))

    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kw):
        pinned.append(pin_memory)
        return real_empty(*args, **kw)

    def store(dev: str) -> dict:
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", empty)
            m.setattr(torch.cuda, "Event", Event)
            m.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", str(device)))
            copied = run_blocks.to_host(res, torch.device(dev), form)
            out = str(tmp_path / dev.replace(":", ""))
            with RunWriter(out, config={"method": "test"}, total=4, storage_dtype="float16") as w:
                run_blocks.write_block(w, 0, 4, copied, [], [], allow_nonfinite=False)
        with open_run(out) as s:
            return s[0:4]

    cpu = store("cpu")
    assert not pinned and not events
    cuda = store("cuda:1")
    assert pinned and all(pinned)  # every host buffer asked for pinned memory
    assert events == [("record", ("stream", "cuda:1"), len(pinned)), ("synchronize",)]  # after every copy; read after the wait
    np.testing.assert_array_equal(cuda["attributions"]["x"], cpu["attributions"]["x"])
    for k in ("delta", "output", "baseline_output", "target", "n_steps"):
        np.testing.assert_array_equal(cuda[k], cpu[k])


def test_cuda_row_probe(monkeypatch):
    """budget.RowPlanner on a CUDA device, its torch.cuda calls stood in for (monkeypatch fails if torch
    2.13 lacks one): a 16-row probe chunk, its peak allocation per row sizes the rest to the memory budget
    (half the free memory, 10% headroom, or memory_budget), the size is remembered for the key, and a
    second planner with the key starts there without probing; a user cap <= 32 rows is used as given."""
    from fastattr import budget

    dev = torch.device("cuda", 0)
    calls = []
    state = {"allocated": 1000, "peak": 1000, "reserved": 1000}
    fakes = {
        "synchronize": lambda device=None: calls.append(("synchronize", device)),
        "reset_peak_memory_stats": lambda device=None: calls.append(("reset", device)),
        "memory_allocated": lambda device=None: state["allocated"],
        "max_memory_allocated": lambda device=None: state["peak"],
        "memory_reserved": lambda device=None: state["reserved"],
        "mem_get_info": lambda device=None: (2**28, 2**34),
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(budget, "_settled", {})

    p = budget.RowPlanner(dev, 100_000, key=("model", "fp32"))
    assert p.rows == budget.CUDA_PROBE_ROWS and p.tuning
    p.begin()
    state["peak"] = 1000 + 16 * 4096  # 4 KiB a row
    p.end(16)
    fit = int(2**28 * budget.CUDA_BUDGET_FRACTION * budget.CUDA_HEADROOM) // 4096
    assert p.rows == fit and not p.tuning
    assert calls == [("synchronize", dev), ("reset", dev)]

    again = budget.RowPlanner(dev, 100_000, key=("model", "fp32"))
    assert again.rows == fit and not again.tuning
    again.begin()
    assert len(calls) == 2  # no probe: no sync

    # memory the allocator caches (the probe chunk's, freed) is free for PyTorch: it counts
    state["reserved"] = 1000 + 2**26
    cached = budget.RowPlanner(dev, 100_000, key=("cached", "fp32"))
    cached.begin()
    cached.end(16)
    assert cached.rows == int((2**28 + 2**26) * budget.CUDA_BUDGET_FRACTION * budget.CUDA_HEADROOM) // 4096
    state["reserved"] = 1000

    capped = budget.RowPlanner(dev, 100_000, max_rows=20, memory_budget="1MiB", key=("other", "fp32"))
    assert capped.rows == 20 and not capped.tuning
    small = budget.RowPlanner(dev, 100_000, memory_budget="1MiB", key=("other", "fp32"))
    small.begin()
    small.end(16)
    assert small.rows == int(2**20 * budget.CUDA_HEADROOM) // 4096

    fixed = budget.RowPlanner(dev, 8, fixed=True, key=("compiled", "fp32"))  # a compiled model: probe, then one size
    assert fixed.rows == budget.CUDA_PROBE_ROWS
    fixed.begin()
    fixed.end(16)
    assert fixed.rows == budget.FIXED_MAX_ROWS and not fixed.tuning  # the fit, at most FIXED_MAX_ROWS, not clamped to the pass


def test_precision_probe_forks_and_restores_the_cuda_rng(monkeypatch):
    """probe.measure on a CUDA device, torch.cuda's RNG and sync calls stood in for: every policy's call
    starts from the same CUDA generator state (noise drawn on the device repeats exactly), the passes are
    synchronized, and the caller's CUDA state is back afterwards."""
    from fastattr import probe

    dev = torch.device("cuda", 0)
    rng = {"state": torch.tensor([7], dtype=torch.uint8)}
    syncs, seen = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": rng["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": rng.__setitem__("state", new.clone()))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))

    def call(policy: str) -> list[torch.Tensor]:
        seen.append((policy, int(rng["state"])))
        rng["state"] = rng["state"] + 1  # a draw on the device advances its generator
        return [torch.ones(2, 3) * (1.001 if policy == "bf16" else 1.0)]

    res = probe.measure(call, "auto", dev, policies=("fp32", "bf16"), repeats=2)
    assert {s for _, s in seen} == {7} and [p for p, _ in seen] == ["fp32", "bf16"] * 2
    assert int(rng["state"]) == 7  # restored
    assert syncs and all(d == dev for d in syncs) and len(syncs) == 2 * len(seen)
    assert res.policy in ("fp32", "bf16") and res.candidates["bf16"]["rel_err_max"] == pytest.approx(1e-3, rel=1e-3)
