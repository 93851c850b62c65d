"""Crashes, interrupts and full disks, with real processes: Ctrl-C (one SIGINT, then two in quick
succession) during a CLI run, a file-size limit (RLIMIT_FSIZE) and a full tmpfs under a run, a
failed write at many points of the shard protocol, and SIGKILL under a shard time limit. Each
must end promptly and cleanly (no hang, no segfault, one clear line), keep every finished shard,
and leave a run that resumes to every sample exactly once."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import resource
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
from fastattr import store
from fastattr.errors import DiskFullError, OptionError
from fastattr.store import Block, RunWriter, open_run, verify_run

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals, rlimits and flock")

MODELS = textwrap.dedent(
    """
    import time
    import torch
    from torch import nn

    class Slow(nn.Module):
        def __init__(self, delay):
            super().__init__()
            self.lin = nn.Linear(3 * 8 * 8, 5)
            self.delay = delay

        def forward(self, x):
            if self.delay:
                time.sleep(self.delay)
            return self.lin(x.flatten(1))

    def linear(delay=0.0):
        torch.manual_seed(0)
        return Slow(float(delay))
    """
)

# The CLI in a child process, on a slow disk: argv[1] seconds more per block written, argv[2] more
# per shard finalized (touching the file "finishing" first): half while sealing it, holding h5py's
# lock as HDF5 does while it waits for the disk, half while the commit thread fsyncs and hashes it.
# Ctrl-C then comes while the writer is busy inside h5py: the case that hung the process in
# interpreter shutdown; or while the shard is being committed.
CLI_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from h5py._objects import phil
    from fastattr.store import shard, writer

    slow_block, slow_finish = float(sys.argv[1]), float(sys.argv[2])
    real_write, real_seal, real_commit = writer.RunWriter._write_block, shard.OpenShard.seal, shard.SealedShard.commit

    def slow_write(self, block):
        with phil:
            time.sleep(slow_block)
        real_write(self, block)

    def slow_seal(self, **kw):
        Path("finishing").touch()
        with phil:
            time.sleep(slow_finish / 2)
        return real_seal(self, **kw)

    def slow_commit(self):
        Path("committing").touch()
        time.sleep(float(os.environ.get("SLOW_COMMIT", slow_finish / 2)))
        return real_commit(self)

    writer.RunWriter._write_block = slow_write
    shard.OpenShard.seal = slow_seal
    shard.SealedShard.commit = slow_commit
    from fastattr.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "crash_models.py").write_text(MODELS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return tmp_path, env


def data(path: Path, n: int, zeros: int = 0) -> np.ndarray:
    """n samples of 3x8x8; the first `zeros` are all zero, so input_x_gradient stores zeros
    there (shards that compress to almost nothing) and incompressible values after."""
    x = np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)
    x[:zeros] = 0
    np.save(path, x)
    return x


def start_cli(tmp_path: Path, env: dict, args: list[str], *, slow_block: float = 0.0, slow_finish: float = 0.0, **popen) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    cmd = [sys.executable, "-c", CLI_CHILD, str(slow_block), str(slow_finish), *args]
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=f, **popen)
    return proc, err


def run_cli(tmp_path: Path, env: dict, args: list[str], **popen) -> tuple[int, str]:
    proc, err = start_cli(tmp_path, env, args, **popen)
    rc = proc.wait(timeout=600)
    return rc, err.read_text()


def listed(run: Path) -> list[dict]:
    try:
        return json.loads((run / "manifest.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return []  # not written yet, or being replaced


def wait_for_shards(proc: subprocess.Popen, run: Path, n: int = 1, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(listed(run)) < n:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {n} shard(s) were listed"
        assert time.monotonic() < deadline, f"no shard listed within {timeout} s"
        time.sleep(0.05)


def lock_is_free(run: Path) -> bool:
    fd = os.open(run / ".fastattr-writer.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def reference(tmp_path: Path, x: np.ndarray, method: str) -> np.ndarray:
    sys.path.insert(0, str(tmp_path))
    try:
        import crash_models
    finally:
        sys.path.remove(str(tmp_path))
    model = crash_models.linear().eval()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        target = model(xt).argmax(1)
    cls = {"saliency": fastattr.Saliency, "input_x_gradient": fastattr.InputXGradient}[method]
    return cls(model).attribute(xt, target=target).detach().numpy()


def assert_complete(run: Path, want: np.ndarray) -> None:
    """Every sample exactly once, with the values a fresh in-process attribution gives."""
    rep = verify_run(run)
    assert rep.ok and rep.samples == len(want), rep.problems
    with open_run(run) as r:
        np.testing.assert_array_equal(r.indices, np.arange(len(want)))
        np.testing.assert_allclose(r[:]["attributions"]["x"], want, rtol=1e-5, atol=1e-6)
    assert not list(run.glob("*.partial"))


def assert_clean_failure(text: str) -> None:
    for raw in ("Traceback", "Exception ignored", "HDF5", "errno =", "Segmentation"):
        assert raw not in text, text


# ------------------------------------------------------------------------------------------------
# Ctrl-C
# ------------------------------------------------------------------------------------------------

RUN_ARGS = ["run", "--model", "crash_models:linear", "--data", "x.npy", "--out", "run", "--method", "saliency", "--shard-size", "100", "--device", "cpu"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_mid_run_saves_what_was_handed_over(work, sig):
    """Ctrl-C, or the SIGTERM a batch scheduler sends before its SIGKILL (exit 143; before, SIGTERM
    killed the process and lost the shard in progress)."""
    tmp_path, env = work
    x = data(tmp_path / "x.npy", 3000)
    run = tmp_path / "run"
    proc, err = start_cli(tmp_path, env, [*RUN_ARGS, "--shard-seconds", "30"], slow_block=1.5)
    try:
        wait_for_shards(proc, run)
        proc.send_signal(sig)
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    text = err.read_text()
    # it writes what it was handed (at most the queue, 4 blocks of 256 samples, and 1 pending) and stops
    assert rc == (143 if sig == signal.SIGTERM else 130) and seconds < 20, (rc, seconds, text)
    assert ("terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted") in text and "Traceback" not in text, text
    assert lock_is_free(run)
    assert not list(run.glob("*.partial"))  # the open shard was finalized, not left behind
    man = json.loads((run / "manifest.json").read_text())
    assert man["config"]["shard_seconds"] == 30.0
    kept = sum(s["rows"] for s in man["shards"])
    assert kept % 256 == 0 and 0 < kept < len(x)  # whole blocks: everything handed over was saved
    rep = verify_run(run)
    assert rep.ok and rep.samples == kept, rep.problems

    rc, text = run_cli(tmp_path, env, RUN_ARGS)  # another shard_seconds: a resume is still allowed
    assert rc == 0, text
    assert_complete(run, reference(tmp_path, x, "saliency"))


def interrupt_while_finalizing(tmp_path: Path, env: dict, signals: int) -> tuple[int, float, str]:
    """Ctrl-C (`signals` times, 0.3 s apart) while the run's last shard is being finalized, on a
    disk that takes 8 s for it: returns the exit status, the seconds from the first signal to the
    exit, and stderr."""
    proc, err = start_cli(tmp_path, env, [*RUN_ARGS, "--shard-size", "4096"], slow_finish=8.0)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "finishing").exists():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.02)
        t0 = time.monotonic()
        for k in range(signals):
            time.sleep(0.3 if k else 0.2)
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within 60 s of Ctrl-C: hung ({err.read_text()})")
        return rc, time.monotonic() - t0, err.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_while_finalizing_waits_for_the_shard(work):
    tmp_path, env = work
    x = data(tmp_path / "x.npy", 600)
    run = tmp_path / "run"
    rc, seconds, text = interrupt_while_finalizing(tmp_path, env, 1)
    assert rc == 130 and seconds < 20, (rc, seconds, text)  # the shard's 8 s, then out
    assert "interrupted" in text and "Traceback" not in text, text
    assert lock_is_free(run)
    assert_complete(run, reference(tmp_path, x, "saliency"))  # the shard in progress was saved


def test_kill_while_a_shard_is_committed(work):
    """SIGKILL while the commit thread fsyncs a sealed shard (the writer meanwhile fills the next):
    nothing unlisted is trusted, and the rerun stores every sample once, with the right values."""
    tmp_path, env = work
    x = data(tmp_path / "x.npy", 600)
    run = tmp_path / "run"
    proc, err = start_cli(tmp_path, {**env, "SLOW_COMMIT": "60"}, RUN_ARGS)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "committing").exists():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.02)
        time.sleep(0.5)  # the writer seals the next shard meanwhile and waits for this commit
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    rep = verify_run(run)
    assert rep.ok and rep.samples == sum(s["rows"] for s in listed(run)), rep.problems
    rc, text = run_cli(tmp_path, env, RUN_ARGS)
    assert rc == 0, text
    assert_complete(run, reference(tmp_path, x, "saliency"))


def test_second_ctrl_c_exits_at_once(work):
    tmp_path, env = work
    x = data(tmp_path / "x.npy", 600)
    run = tmp_path / "run"
    rc, seconds, text = interrupt_while_finalizing(tmp_path, env, 2)
    assert rc == 130 and seconds < 4, (rc, seconds, text)  # not the 8 s the shard takes
    assert "interrupted again: quitting now" in text and "Traceback" not in text, text
    assert lock_is_free(run)
    rep = verify_run(run)  # what it leaves is what a kill leaves: nothing listed but intact shards
    assert rep.ok and rep.samples == 0, rep.problems

    rc, text = run_cli(tmp_path, env, RUN_ARGS)
    assert rc == 0, text
    assert_complete(run, reference(tmp_path, x, "saliency"))


# ------------------------------------------------------------------------------------------------
# full disks: the file-size limit, a full tmpfs, and a failed write anywhere in a shard
# ------------------------------------------------------------------------------------------------

FULL_ARGS = ["run", "--model", "crash_models:linear", "--data", "x.npy", "--out", "run", "--method", "input_x_gradient", "--shard-size", "256", "--device", "cpu"]


def test_file_size_limit_is_a_clean_error_and_resumes(work):
    tmp_path, env = work
    x = data(tmp_path / "x.npy", 1024, zeros=256)  # shard 0 compresses to ~20 KB, the others are ~200 KB
    run = tmp_path / "run"
    limit = 100 * 1024
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    rc, text = run_cli(tmp_path, env, FULL_ARGS, preexec_fn=limited)
    assert rc == 2, (rc, text)  # not -11 (segfault) nor -25 (SIGXFSZ)
    assert f"file too large: the file-size limit ({limit} bytes; ulimit -f, RLIMIT_FSIZE) was reached while writing .fastattr-shard-00001.h5.partial in run" in text, text
    assert "finished shards are intact" in text and "rerun the same command to resume" in text
    assert_clean_failure(text)
    assert [(s["start"], s["stop"]) for s in listed(run)] == [(0, 256)]
    rep = verify_run(run)
    assert rep.ok and rep.samples == 256, rep.problems

    rc, text = run_cli(tmp_path, env, FULL_ARGS)  # the limit lifted
    assert rc == 0, text
    assert_complete(run, reference(tmp_path, x, "input_x_gradient"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 640 KiB tmpfs (root only: skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mnt)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_full_disk_is_a_clean_error_and_resumes(work, small_tmpfs):
    tmp_path, env = work
    x = data(tmp_path / "x.npy", 2048, zeros=256)
    run = small_tmpfs / "run"
    args = list(FULL_ARGS)
    args[args.index("--out") + 1] = str(run)
    rc, text = run_cli(tmp_path, env, args)
    assert rc == 2, (rc, text)
    m = re.search(r"disk full while writing ((?:\.fastattr-)?shard-\d+\.h5\.partial|manifest\.json) in \S+: ([\d,]+) bytes free; finished shards are intact; free space", text)
    assert m, text
    assert_clean_failure(text)
    kept = listed(run)
    assert kept and kept[0]["start"] == 0
    rep = verify_run(run)
    assert rep.ok and rep.samples == sum(s["rows"] for s in kept) < len(x), rep.problems

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True, timeout=30)
    rc, text = run_cli(tmp_path, env, args)
    assert rc == 0, text
    assert_complete(run, reference(tmp_path, x, "input_x_gradient"))


# One process writes many runs, each under another file-size limit, so that the write fails at
# every stage of a shard: creating it, appending (a chunk evicted from the cache), flushing it
# before the close. Each must raise DiskFullError (not crash), keep the finished shards, and
# resume to the full run once the limit is lifted.
SWEEP_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import fastattr.store as store
    from fastattr.errors import DiskFullError, OptionError

    SHAPE = (3, 32, 32)

    def attributions(i):
        out = np.zeros((len(i), *SHAPE), np.float32)  # samples < 64 zero: two small shards first
        for k, j in enumerate(i):
            if j >= 64:
                out[k] = np.random.default_rng(int(j)).standard_normal(SHAPE, dtype=np.float32)
        return out

    def block(a, b):
        i = np.arange(a, b)
        f = i.astype(np.float32)
        return store.Block(start=a, stop=b, attributions={"x": attributions(i)}, target=i % 7, output=f, baseline_output=f - 1,
                           delta=f * 0, n_steps=np.ones(b - a, np.int32),
                           stats={"sum": f, "l1": f, "l2": f, "absmax": f, "nonfinite": np.zeros(b - a, np.int32)})

    def fill(w):
        for a, b in w.missing():
            for s in range(a, b, 8):
                w.put(block(s, min(s + 8, b)))
        w.close()

    root, total, rows = sys.argv[1], 200, 32
    config = {"method": "ig", "fingerprints": {"model": "m", "data": "d"}}
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    for k, limit in enumerate(int(v) for v in sys.argv[2:]):
        run = f"{root}/run{k}"
        w = None
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            w = store.RunWriter(run, config=config, total=total, shard_rows=rows)
            fill(w)
            outcome = "complete"
        except DiskFullError as exc:
            outcome = str(exc)
            if w is not None:
                w.abort()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        rep = store.verify_run(run)
        with store.open_run(run) as r:
            kept = len(r)
            kept_ok = kept == 0 or bool(np.array_equal(r[:]["attributions"]["x"], attributions(np.arange(kept))))
        fill(store.RunWriter(run, config=config, total=total, shard_rows=rows))
        rep2 = store.verify_run(run)
        with store.open_run(run) as r:
            full = bool(np.array_equal(r.indices, np.arange(total))) and bool(np.array_equal(r[:]["attributions"]["x"], attributions(np.arange(total))))
        print(json.dumps({"limit": limit, "outcome": outcome, "ok": rep.ok, "kept": kept, "kept_ok": kept_ok, "resumed": rep2.ok and full}), flush=True)
    """
)


def test_failed_writes_never_crash(tmp_path):
    limits = [500, 3_000, 8_000, 20_000, 60_000, 100_000, 150_000, 200_000, 250_000, 300_000, 350_000, 390_000]
    r = subprocess.run([sys.executable, "-c", SWEEP_CHILD, str(tmp_path), *map(str, limits)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])  # -11 was h5py crashing in close()
    assert_clean_failure(r.stderr)
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [res["limit"] for res in results] == limits
    for res in results:
        assert res["outcome"].startswith(f"file too large: the file-size limit ({res['limit']} bytes"), res
        assert "finished shards are intact" in res["outcome"], res
        assert res["ok"] and res["kept_ok"] and res["resumed"], res
        assert res["kept"] in (0, 32, 64), res  # whole shards; the zero shards fit under 60 KB
    assert any(res["kept"] == 64 for res in results) and any(res["kept"] == 0 for res in results)


def test_manifest_write_failing_for_space_is_a_disk_full_error(tmp_path, monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    run = tmp_path / "run"
    w = RunWriter(run, config={"method": "ig"}, total=20, shard_rows=8)
    monkeypatch.setattr(store.rundir, "write_json_atomic", full)
    f = np.arange(8, dtype=np.float32)
    stats = {"sum": f, "l1": f, "l2": f, "absmax": f, "nonfinite": np.zeros(8, np.int32)}
    w.put(Block(start=0, stop=8, attributions={"x": np.ones((8, 2), np.float32)}, target=np.zeros(8, np.int64), output=f,
                baseline_output=f, delta=f, n_steps=np.ones(8, np.int32), stats=stats))
    with pytest.raises(DiskFullError, match=r"disk full while writing manifest\.json in .*: [\d,]+ bytes free; finished shards are intact"):
        w.close()
    monkeypatch.undo()
    w = RunWriter(run, config={"method": "ig"}, total=20, shard_rows=8)  # the unlisted shard is an orphan: deleted
    assert w.covered == [] and not list(run.glob("shard-*"))
    w.abort()


# ------------------------------------------------------------------------------------------------
# SIGKILL under a time limit per shard
# ------------------------------------------------------------------------------------------------

KILL_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import fastattr
    import crash_models

    x = np.load("x.npy")
    fastattr.run(crash_models.linear(delay=0.05), x, "run", method="saliency", examples_per_batch=8, shard_size=4096,
                 shard_seconds=1.0, progress=False, device="cpu")
    print("finished", flush=True)
    """
)


def test_sigkill_loses_at_most_one_shard_seconds_worth(work):
    tmp_path, env = work
    x = data(tmp_path / "x.npy", 400)
    run = tmp_path / "run"
    err = tmp_path / "kill-stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=f, text=True)
    try:
        wait_for_shards(proc, run, n=2)  # a shard every second although 4096 rows would take the whole run
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, err.read_text()
    kept = listed(run)
    stored = sum(s["rows"] for s in kept)
    assert len(kept) >= 2 and 0 < stored < len(x), kept
    assert [s["start"] for s in kept] == [0, *(s["stop"] for s in kept[:-1])]  # the early samples, in order
    rep = verify_run(run)
    assert rep.ok and rep.samples == stored, rep.problems

    rc = subprocess.run([sys.executable, "-c", KILL_CHILD], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0 and "finished" in rc.stdout, rc.stderr
    assert_complete(run, reference(tmp_path, x, "saliency"))


def test_shard_seconds_finalizes_while_no_block_comes(tmp_path):
    f = np.arange(10, dtype=np.float32)
    stats = {"sum": f, "l1": f, "l2": f, "absmax": f, "nonfinite": np.zeros(10, np.int32)}

    def blk(a):
        return Block(start=a, stop=a + 10, attributions={"x": np.ones((10, 2), np.float32)}, target=np.zeros(10, np.int64), output=f,
                     baseline_output=f, delta=f, n_steps=np.ones(10, np.int32), stats=stats)

    w = RunWriter(tmp_path / "run", config={"method": "ig"}, total=30, shard_rows=1000, max_shard_seconds=0.2)
    w.put(blk(0))
    deadline = time.monotonic() + 10
    while not w.covered and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.covered == [(0, 10)]  # listed while the writer waits for the next block
    w.put(blk(10))
    w.put(blk(20))
    w.close()
    assert w.complete and w.covered == [(0, 30)]
    with pytest.raises(ValueError, match="max_shard_seconds"):
        RunWriter(tmp_path / "other", config={"method": "ig"}, total=1, max_shard_seconds=0)
    with pytest.raises(OptionError, match="shard_seconds"):
        fastattr.run(torch.nn.Linear(2, 2), np.zeros((2, 2), np.float32), str(tmp_path / "r"), shard_seconds=-1)
