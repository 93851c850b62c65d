"""Records a demanding user could be fooled by, found by adversarial testing (README "Whole
datasets"): another run's shard copied into a run directory, listed shards swapped for another
run's with the manifest's checksums updated, and a manifest whose config was edited to let a
different call resume. Each must be reported or refused, naming the problem, and fastattr must
never delete a file it did not write in this run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastattr
from fastattr.errors import CorruptShardError, RunMismatchError
from fastattr.store import Block, RunWriter, open_run, verify_run

CONFIG = {
    "method": "integrated_gradients",
    "params": {"n_steps": 8},
    "fingerprints": {"model": "m0", "data": {"count": 0}},
}
SHAPE = (3, 4)


def block(start: int, stop: int, scale: float = 1.0) -> Block:
    i = np.arange(start, stop)
    f = i.astype(np.float32)
    a = np.ones((len(i), *SHAPE), np.float32) * f[:, None, None] * np.float32(scale)
    flat = a.reshape(len(i), -1)
    return Block(
        start=start, stop=stop, attributions={"x": a}, target=i % 3, output=f, baseline_output=np.zeros(len(i), np.float32),
        delta=np.zeros(len(i), np.float32), n_steps=np.full(len(i), 8, np.int32),
        stats={"sum": flat.sum(1), "l1": np.abs(flat).sum(1), "l2": np.sqrt((flat**2).sum(1)), "absmax": np.abs(flat).max(1),
               "nonfinite": np.zeros(len(i), np.int32)},
    )  # fmt: skip


def write(run: Path, total: int = 30, config: dict = CONFIG, scale: float = 1.0, **kw) -> None:
    with RunWriter(run, config=config, total=total, shard_rows=10, **kw) as w:
        for a in range(0, total, 10):
            w.put(block(a, min(a + 10, total), scale))


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def save_manifest(run: Path, man: dict) -> None:
    (run / "manifest.json").write_text(json.dumps(man, indent=1))


def rehash(run: Path, name: str) -> None:
    man = manifest(run)
    for s in man["shards"]:
        if s["file"] == name:
            s["sha256"] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    save_manifest(run, man)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_shard_of_another_run_copied_in_is_never_deleted(tmp_path, overwrite):
    """A user keeps a copy of run B's shard in run A's directory under a shard name A does not list:
    resuming (or overwriting) A must leave it alone. (It was deleted as an "orphan" of A.)"""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a)
    write(b, scale=2.0)
    copy = a / "shard-00007.h5"
    shutil.copy(b / "shard-00001.h5", copy)
    before = copy.read_bytes()
    if overwrite:
        write(a, overwrite=True)
    else:
        RunWriter(a, config=CONFIG, total=30, shard_rows=10).close()  # a resume of the complete run
    assert copy.read_bytes() == before
    rep = verify_run(a)
    assert rep.verdict == "OK" and any("shard-00007.h5" in w for w in rep.warnings), rep.lines()
    # an orphan of this run (finished but never listed) is still deleted
    man = manifest(a)
    orphan = man["shards"].pop()["file"]
    man["status"] = "running"
    save_manifest(a, man)
    with RunWriter(a, config=CONFIG, total=30, shard_rows=10) as w:
        assert w.missing() == [(20, 30)]
        w.put(block(20, 30))
    assert orphan in {s["file"] for s in manifest(a)["shards"]} or not (a / orphan).exists()
    assert copy.read_bytes() == before


def test_another_runs_shard_with_its_checksum_updated_is_caught(tmp_path):
    """Run B's shard of the same range put in place of run A's, the manifest's sha256 updated to
    match: verify, the reader and a resume must all see it is not this run's shard. (All three
    accepted it, and resume reported the run complete with B's numbers.)"""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a)
    write(b, scale=2.0)
    shutil.copy(b / "shard-00001.h5", a / "shard-00001.h5")
    rehash(a, "shard-00001.h5")
    rep = verify_run(a)
    assert rep.verdict == "FAILED" and rep.exit_code == 1
    assert any("shard-00001.h5" in p and "another run" in p for p in rep.problems), rep.problems
    with pytest.raises(CorruptShardError, match="shard-00001.h5.*another run"):
        open_run(a)
    with RunWriter(a, config=CONFIG, total=30, shard_rows=10) as w:  # resume: set aside, recomputed
        assert w.missing() == [(10, 20)]
        w.put(block(10, 20))
    assert (a / "shard-00001.h5.corrupt").is_file()
    with open_run(a) as r:
        np.testing.assert_array_equal(r[:]["attributions"]["x"], block(0, 30).attributions["x"])
    assert verify_run(a).verdict == "OK"


def test_a_manifest_edited_to_another_config_is_caught(tmp_path):
    """The user edits manifest.json's config (here n_steps 8 -> 16) so that a call with other
    options resumes: the stored shards were made with the old options, so verify must fail naming
    the key, the reader must refuse them, and the resume must recompute them instead of mixing."""
    run = tmp_path / "run"
    write(run)
    man = manifest(run)
    for s in man["shards"][2:]:
        (run / s["file"]).unlink()
    man["shards"] = man["shards"][:2]
    man["status"] = "running"
    man["config"]["params"]["n_steps"] = 16
    save_manifest(run, man)
    rep = verify_run(run)
    assert rep.verdict == "FAILED" and any("params.n_steps" in p for p in rep.problems), rep.problems
    with pytest.raises(CorruptShardError, match="another config.*params.n_steps"):
        open_run(run)
    edited = {**CONFIG, "params": {"n_steps": 16}}
    with RunWriter(run, config=edited, total=30, shard_rows=10) as w:
        assert w.missing() == [(0, 30)]  # nothing of the old config is kept in the run
        w.put(block(0, 30, 3.0))
    assert verify_run(run).verdict == "OK"
    assert sorted(p.name for p in run.glob("*.corrupt")) == ["shard-00000.h5.corrupt", "shard-00001.h5.corrupt"]


def test_volatile_keys_may_differ_between_shards_and_manifest(tmp_path):
    """Keys a resume may change (versions, compression, shard_size, ...) never make a shard suspect,
    also for manifests written before they recorded their volatile keys."""
    run = tmp_path / "run"
    first = {**CONFIG, "versions": {"fastattr": "0.1"}, "compression": "gzip"}
    volatile = {"versions", "compression"}
    with RunWriter(run, config=first, total=30, shard_rows=10, volatile_keys=volatile) as w:
        w.put(block(0, 10))
    later = {**CONFIG, "versions": {"fastattr": "0.2"}, "compression": "none"}
    with RunWriter(run, config=later, total=30, shard_rows=10, volatile_keys=volatile) as w:
        assert w.missing() == [(10, 30)]
        w.put(block(10, 30))
    assert verify_run(run).verdict == "OK"
    man = manifest(run)
    assert man["volatile_keys"] == ["compression", "versions"]
    del man["volatile_keys"]  # as written before: fastattr.run's set applies
    save_manifest(run, man)
    assert verify_run(run).verdict == "OK"
    assert len(open_run(run)) == 30


def _linear(weight: float) -> torch.nn.Module:
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.zero_()
    return model


def test_verify_judges_non_finite_samples_by_the_call_that_stored_them(tmp_path):
    """allow_nonfinite may change between the calls of a resumed run, and each call rewrote the
    manifest's config: a no-op rerun with the flag flipped turned verify's verdict on samples it
    never touched (OK -> FAILED for NaN samples stored under allow_nonfinite=True; FAILED -> OK for
    float16 overflows stored without it, hiding them)."""
    x = np.ones((20, 4), np.float32)
    x[3, 1] = np.nan
    run = tmp_path / "nan"
    kw = dict(method="input_x_gradient", target=0, batch_size=8, shard_size=10, progress=False)
    fastattr.run(_linear(1.0), x, str(run), allow_nonfinite=True, **kw)
    assert verify_run(run).verdict == "OK"
    assert fastattr.run(_linear(1.0), x, str(run), allow_nonfinite=False, **kw).computed == 0
    rep = verify_run(run)
    assert rep.verdict == "OK" and any("[3, 4)" in n and "allow_nonfinite" in n for n in rep.notes), rep.lines()


def test_verify_still_fails_float16_overflows_after_a_rerun_that_allows_non_finite(tmp_path):
    """The other direction: overflows stored by a call without allow_nonfinite stay a failure."""
    kw = dict(method="input_x_gradient", target=0, batch_size=8, shard_size=10, progress=False)
    big = np.ones((20, 4), np.float32)
    big[12] = 1000.0  # x * w = 1e5: beyond float16's 65504, stored as inf
    run = tmp_path / "f16"
    fastattr.run(_linear(100.0), big, str(run), storage_dtype="float16", allow_nonfinite=False, **kw)
    assert verify_run(run).verdict == "FAILED"
    assert (
        fastattr.run(_linear(100.0), big, str(run), storage_dtype="float16", allow_nonfinite=True, **kw).computed == 0
    )
    rep = verify_run(run)
    assert rep.verdict == "FAILED" and rep.exit_code == 1 and any("[12, 13)" in p for p in rep.problems), rep.lines()


# ------------------------------------------------------------------------------------------------
# Real kills: every stored value equals a clean run's, bit for bit
# ------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time, json
    import numpy as np, torch
    import fastattr

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.lin = torch.nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            time.sleep(float(sys.argv[3]))
            return self.lin(torch.tanh(self.conv(x)).flatten(1))

    fastattr.run(Net(), sys.argv[1], sys.argv[2], progress=False, **json.loads(sys.argv[4]))
    """
)
KILL_OPTS = dict(method="ig", n_steps=4, target=0, batch_size=16, examples_per_batch=8, shard_size=24, shard_seconds=None,
                 compression="gzip", storage_dtype="float16", channel_reduce="sum")  # fmt: skip


def _child(x_path: Path, run: Path, delay: float, **opts: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTATTR_ENCODE_THREADS": "2"}
    cmd = [sys.executable, "-c", CHILD, str(x_path), str(run), str(delay), json.dumps({**KILL_OPTS, **opts})]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _fields(run: Path) -> dict[str, np.ndarray]:
    with open_run(run) as r:
        whole = r[:]
    out = {"attributions/x": whole["attributions"]["x"]}
    out.update({f"stats/{k}": v for k, v in whole["stats"].items()})
    out.update({k: v for k, v in whole.items() if isinstance(v, np.ndarray)})
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_killed_gzip_float16_reduced_run_resumes_to_a_clean_runs_bits(tmp_path):
    """A float16, channel-reduced run encoding gzip chunks in the thread pool is SIGKILLed once a
    shard is listed and a block of the next is being written; the resume must store every sample
    once, each value bit for bit what a clean run stores (same process settings), and verify OK.
    (Held in 100+ random-time SIGKILL / SIGINT trials over gzip, auto, lzf, float16 and
    channel_reduce, API and CLI; this is the fast regression case.)"""
    x = np.random.default_rng(0).standard_normal((96, 3, 8, 8)).astype(np.float32)
    x[:24] = np.round(x[:24])  # compressible: gzip shards with real deflate work
    np.save(tmp_path / "x.npy", x)
    clean, run = tmp_path / "clean", tmp_path / "run"
    reference = _child(tmp_path / "x.npy", clean, 0.0)  # alongside the run that is killed
    proc = _child(tmp_path / "x.npy", run, 0.02)
    deadline = time.monotonic() + 120
    while not _listed(run):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    time.sleep(0.1)  # into the next shard
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    stored = sum(s["rows"] for s in _listed(run))
    assert 0 < stored < 96 or proc.returncode == 0
    rep = verify_run(run)
    assert rep.ok and (rep.verdict == "INCOMPLETE") == (stored < 96), rep.lines()
    assert _child(tmp_path / "x.npy", run, 0.0).wait(timeout=120) == 0
    assert reference.wait(timeout=120) == 0
    rep = verify_run(run)
    assert rep.verdict == "OK" and rep.samples == 96, rep.lines()
    want, got = _fields(clean), _fields(run)
    assert sorted(want) == sorted(got)
    for key in want:
        assert want[key].dtype == got[key].dtype and want[key].tobytes() == got[key].tobytes(), key
    assert not list(run.glob("*.partial")) and not list(run.glob(".fastattr-*.partial"))


def _listed(run: Path) -> list[dict]:
    try:
        return json.loads((run / "manifest.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return []


def test_verify_escapes_what_a_manifest_says(tmp_path):
    """verify quotes the manifest (file names, run ids, keys): an edited manifest must not drive the
    terminal through them. (A listed file name with escape codes was printed raw.)"""
    run = tmp_path / "run"
    write(run)
    man = manifest(run)
    evil = "\x1b]0;owned\x07\x1b[2J\u202e"
    man["shards"][0]["file"] = evil + "shard.h5"
    man["run_id"] = evil
    save_manifest(run, man)
    r = subprocess.run(
        [sys.executable, "-m", "fastattr", "verify", str(run)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and r.stdout.startswith("FAILED"), r.stdout + r.stderr
    assert not any(ch in r.stdout + r.stderr for ch in "\x1b\x07\u202e"), repr(r.stdout)
    assert "\\x1b]0;owned" in r.stdout


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def test_resume_refuses_another_output_function_of_the_same_name(tmp_path):
    """output= callables were recorded by name only, and every lambda is "<lambda>": a resume that
    attributes another head (o[1] instead of o[0]) mixed the two into one run silently."""
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    run = tmp_path / "run"
    kw = dict(method="saliency", target="predicted", batch_size=8, shard_size=10, progress=False)
    fastattr.run(_TwoHeads(), x[:10], str(run), output=lambda o: o[0], **kw)
    fastattr.run(_TwoHeads(), x[:10], str(run), output=lambda o: o[0], **kw)  # the same code resumes
    with pytest.raises(RunMismatchError, match="output.code"):
        fastattr.run(_TwoHeads(), x[:10], str(run), output=lambda o: o[1], **kw)
    head = 1
    fastattr.run(_TwoHeads(), x[:10], str(tmp_path / "closure"), output=lambda o: o[head], **kw)
    head = 0
    with pytest.raises(RunMismatchError, match="output.code"):  # the value it closes over counts too
        fastattr.run(_TwoHeads(), x[:10], str(tmp_path / "closure"), output=lambda o: o[head], **kw)


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, opts: dict | None = None) -> torch.Tensor:
        return self.lin(x) * opts["scale"]


def test_resume_refuses_a_changed_setting_inside_a_forward_kwarg(tmp_path):
    """A dict forward kwarg was recorded as {"object": "builtins.dict"}: changing a value in it
    between calls resumed into one mixed run."""
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    kw = dict(method="saliency", target=0, batch_size=8, shard_size=10, progress=False)
    fastattr.run(_Scaled(), x, str(tmp_path / "run"), forward_kwargs={"opts": {"scale": 1.0}}, **kw)
    with pytest.raises(RunMismatchError, match="forward_kwargs.opts.scale"):
        fastattr.run(_Scaled(), x, str(tmp_path / "run"), forward_kwargs={"opts": {"scale": 5.0}}, **kw)
