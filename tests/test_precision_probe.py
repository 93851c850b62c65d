"""Precision probes (fastattr/probe.py): the error of bf16/fp16/tf32 against fp32 measured on a few
samples, recorded by runs and calls, warned about over a threshold; precision="auto" follows it."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastattr
from fastattr import probe as probe_mod
from fastattr.errors import OptionError
from fastattr.store import open_run

pytestmark = pytest.mark.usefixtures("single_thread")


def deep_relu_cnn(depth: int = 8, ch: int = 8, seed: int = 0) -> nn.Module:
    """A deep random ReLU CNN: bf16's rounding compounds through the layers (measured 7% IG error at depth 8)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 5)).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def shallow_gelu(seed: int = 0) -> nn.Module:
    """A shallow linear/GELU model: bf16 is within 1% of fp32 (measured 0.3-0.7%)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()


# --------------------------------------------------------------------------- the pure parts


def test_choose_takes_the_fastest_policy_within_tolerance():
    fast = {"fp32": 1.0, "tf32": 0.6, "bf16": 0.4, "fp16": 0.3}
    assert probe_mod.choose({"fp32": 0.0, "bf16": 0.005}, fast, 0.01) == "bf16"
    assert probe_mod.choose({"fp32": 0.0, "bf16": 0.23}, fast, 0.01) == "fp32"  # ResNet-50's bf16: too far off
    assert probe_mod.choose({"fp32": 0.0, "bf16": 0.005}, {"fp32": 0.5, "bf16": 0.9}, 0.01) == "fp32"  # accurate but slower
    errs = {"fp32": 0.0, "tf32": 0.001, "bf16": 0.02, "fp16": 0.008}
    assert probe_mod.choose(errs, fast, 0.01) == "fp16"
    assert probe_mod.choose(errs, fast, 0.005) == "tf32"
    assert probe_mod.choose({"fp32": 0.0, "bf16": math.inf}, fast, 0.01) == "fp32"
    assert probe_mod.choose({"bf16": 0.5}, fast, 0.01) == "fp32"  # nothing qualifies: fp32


def test_rel_errors_per_sample():
    ref = [torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])]
    got = [torch.tensor([[3.0, 4.5], [0.0, 0.0], [1.0, 0.0], [float("nan"), 0.0]])]
    err = probe_mod.rel_errors(ref, got)
    assert err.tolist() == [pytest.approx(0.1), 0.0, math.inf, math.inf]
    two = probe_mod.rel_errors([torch.ones(1, 3), torch.ones(1, 1)], [torch.ones(1, 3), torch.zeros(1, 1)])  # over every input
    assert float(two[0]) == pytest.approx(0.5)


def test_probe_options_are_checked():
    with pytest.raises(OptionError, match="probe_samples"):
        fastattr.Options(probe_samples=0)
    with pytest.raises(OptionError, match="precision_tolerance"):
        fastattr.Options(precision_tolerance=-1)
    with pytest.raises(OptionError, match="precision"):
        fastattr.Options(precision="bf17")
    assert fastattr.Options(precision="auto").precision == "auto"


# --------------------------------------------------------------------------- attribution calls


def test_call_probe_is_recorded_and_warns(caplog):
    model, x = deep_relu_cnn(), torch.randn(6, 3, 8, 8)
    ig = fastattr.IntegratedGradients(model)
    with caplog.at_level(logging.WARNING, logger="fastattr.probe"):
        attr = ig.attribute(x, target=1, n_steps=4, precision="bf16", probe=True, probe_samples=3)
    p = ig.last_probe
    assert attr.shape == x.shape and p.policy == "bf16" and p.requested == "bf16" and p.samples == 3 and p.reference == "fp32"
    # the probe's error is the error of this very call's first samples against fp32
    want = probe_mod.rel_errors([ig.attribute(x[:3], target=1, n_steps=4)], [attr[:3]])
    assert p.rel_err_max == pytest.approx(float(want.max()), rel=1e-6) and p.rel_err_median == pytest.approx(float(want.median()), rel=1e-6)
    assert p.rel_err_max > 0.01  # a deep random ReLU CNN in bf16
    assert any("probe error" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_call_probe_under_the_threshold_does_not_warn(caplog):
    model, x = shallow_gelu(), torch.randn(5, 16)
    ig = fastattr.IntegratedGradients(model)
    with caplog.at_level(logging.WARNING, logger="fastattr.probe"):
        ig.attribute(x, target=0, n_steps=8, precision="bf16", probe=True, precision_warn=0.05)
    assert 0 < ig.last_probe.rel_err_max < 0.05
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # probe=False (the default): nothing measured
    fresh = fastattr.IntegratedGradients(model)
    fresh.attribute(x, target=0, n_steps=8, precision="bf16")
    assert fresh.last_probe is None


def test_auto_picks_fp32_where_bf16_is_far_off():
    """Whatever the timings: bf16's error is over the tolerance, so only fp32 qualifies."""
    model, x = deep_relu_cnn(), torch.randn(4, 3, 8, 8)
    ig = fastattr.IntegratedGradients(model)
    attr = ig.attribute(x, target=1, n_steps=4, precision="auto")
    p = ig.last_probe
    assert set(p.candidates) == {"fp32", "bf16"} and p.candidates["bf16"]["rel_err_max"] > 0.01
    assert p.policy == "fp32" and p.rel_err_max == 0.0
    torch.testing.assert_close(attr, ig.attribute(x, target=1, n_steps=4, precision="fp32"))  # the call ran in fp32


def test_auto_follows_the_probe_where_bf16_is_accurate():
    """The choice is choose() of the recorded errors and times (which policy wins depends on this CPU's speed)."""
    model, x = shallow_gelu(), torch.randn(4, 16)
    ig = fastattr.IntegratedGradients(model)
    attr = ig.attribute(x, target=0, n_steps=8, precision="auto", precision_tolerance=0.05)
    p = ig.last_probe
    assert p.candidates["bf16"]["rel_err_max"] < 0.05 and all(c["seconds"] > 0 for c in p.candidates.values())
    errs = {k: c["rel_err_max"] for k, c in p.candidates.items()}
    assert p.policy == probe_mod.choose(errs, {k: c["seconds"] for k, c in p.candidates.items()}, 0.05)
    torch.testing.assert_close(attr, ig.attribute(x, target=0, n_steps=8, precision=p.policy))


def test_probe_cuts_per_sample_arguments_and_repeats_random_draws():
    torch.manual_seed(0)
    model, x = shallow_gelu(), torch.randn(7, 16)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    ig = fastattr.IntegratedGradients(model)
    ig.attribute(x, baselines=torch.randn(7, 16), target=target, n_steps=8, precision="bf16", probe=True, probe_samples=2)
    assert ig.last_probe.samples == 2 and ig.last_probe.rel_err_max < 0.05
    # NoiseTunnel: fp32 and bf16 see the same noise (else the error would be of order 100%)
    nt = fastattr.NoiseTunnel(fastattr.Saliency(model))
    state = torch.get_rng_state()
    nt.attribute(x, nt_samples=4, stdevs=0.5, target=target, precision="bf16", probe=True)
    assert nt.last_probe.rel_err_max < 0.05
    # GradientShap keeps its reference distribution whole (7 references, not cut to 4 samples)
    gs = fastattr.GradientShap(model)
    gs.attribute(x, baselines=torch.randn(7, 16), target=target, n_samples=3, precision="bf16", probe=True)
    assert gs.last_probe.samples == 4 and gs.last_probe.rel_err_max < 0.05
    assert not torch.equal(state, torch.get_rng_state())  # the calls themselves drew noise after the probe restored the state


# --------------------------------------------------------------------------- dataset runs


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_run_records_the_probe_and_warns(tmp_path, caplog):
    x = torch.randn(10, 3, 8, 8).numpy()
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="fastattr.probe"):
        summary = fastattr.run(deep_relu_cnn(), x, str(out), n_steps=4, precision="bf16", progress=False, examples_per_batch=4)
    probe = summary.precision_probe
    assert probe["policy"] == "bf16" and probe["samples"] == 4 and probe["reference"] == "fp32" and probe["rel_err_max"] > 0.01
    assert 0 < probe["rel_err_median"] <= probe["rel_err_max"]
    assert _manifest(out)["config"]["precision_probe"] == probe
    assert any("probe error" in line for line in summary.lines())
    assert any("precision_warn" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # the recorded error is the stored attributions' error against fp32 on the probe samples
    ref = tmp_path / "ref"
    fastattr.run(deep_relu_cnn(), x, str(ref), n_steps=4, progress=False, batch_size=16)
    with open_run(str(out)) as a, open_run(str(ref)) as b:
        got, want = torch.from_numpy(a.field("attributions/x")[:4]), torch.from_numpy(b.field("attributions/x")[:4])
    assert probe["rel_err_max"] == pytest.approx(float(probe_mod.rel_errors([want], [got]).max()), rel=1e-4)
    assert "precision_probe" not in _manifest(ref)["config"]  # fp32 runs: nothing to probe


def test_resume_is_not_blocked_by_a_remeasured_probe(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)
    out = str(tmp_path / "run")
    fastattr.run(shallow_gelu(), x, out, n_steps=8, precision="bf16", progress=False)
    first = _manifest(tmp_path / "run")["config"]["precision_probe"]
    real = probe_mod.measure

    def remeasured(*args, **kwargs):  # a new measurement on another host: other times, another error
        res = real(*args, **kwargs)
        res.rel_err_max, res.seconds = res.rel_err_max * 1.5, {k: v + 1.0 for k, v in res.seconds.items()}
        return res

    monkeypatch.setattr("fastattr.runner.measure", remeasured)
    summary = fastattr.run(shallow_gelu(), x, out, n_steps=8, precision="bf16", progress=False)
    assert summary.complete and summary.computed == 0
    second = _manifest(tmp_path / "run")["config"]["precision_probe"]
    assert second["rel_err_max"] == pytest.approx(first["rel_err_max"] * 1.5, rel=1e-3) and second != first


def test_auto_run_records_the_choice_and_resumes_with_it(tmp_path, monkeypatch, capsys):
    x = torch.randn(8, 3, 8, 8).numpy()
    out = tmp_path / "run"
    # fixed rows per forward: on CPU the chunk sizes decide the last bits of a conv's results, and the
    # row tuner carries what the probe's passes measured into the run's own passes
    summary = fastattr.run(deep_relu_cnn(), x, str(out), n_steps=4, precision="auto", progress=False, shard_size=4, batch_size=16)
    probe = _manifest(out)["config"]["precision_probe"]
    assert _manifest(out)["config"]["precision"] == "auto"
    assert probe["requested"] == "auto" and probe["policy"] == "fp32" and probe["tolerance"] == 0.01
    assert set(probe["candidates"]) == {"fp32", "bf16"} and probe["candidates"]["bf16"]["rel_err_max"] > 0.01
    assert summary.precision_probe == probe
    # the stored attributions are fp32's
    ref = tmp_path / "ref"
    fastattr.run(deep_relu_cnn(), x, str(ref), n_steps=4, progress=False, batch_size=16)
    with open_run(str(out)) as a, open_run(str(ref)) as b:
        np.testing.assert_array_equal(a.field("attributions/x"), b.field("attributions/x"))
    # resuming an auto run keeps its recorded choice instead of timing the policies again
    monkeypatch.setattr("fastattr.runner.measure", lambda *a, **k: pytest.fail("re-measured on resume"))
    again = fastattr.run(deep_relu_cnn(), x, str(out), n_steps=4, precision="auto", progress=False, shard_size=4, batch_size=16)
    assert again.precision_probe == probe
    from fastattr.cli import main

    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "precision fp32 (auto" in shown and "probe error vs fp32 on 4 samples" in shown


def test_probe_through_a_prepared_options_object():
    model, x = shallow_gelu(), torch.randn(6, 16)
    opts = fastattr.Options(precision="bf16", probe=True, probe_samples=3, forward_kwargs={})
    sal = fastattr.Saliency(model)
    sal.attribute(x, target=2, options=opts)
    assert sal.last_probe.samples == 3 and sal.last_probe.policy == "bf16"
    first = sal.last_probe
    sal.attribute(x, target=2, options=opts, probe=False)  # a keyword next to options= overrides it: no new probe
    assert sal.last_probe is first
    lay = fastattr.LayerActivation(model, model[1])
    lay.attribute(x, precision="auto")  # forward-only capture: the probe compares activations
    assert lay.last_probe.requested == "auto" and lay.last_probe.policy in ("fp32", "bf16")
