"""Distributed runs under torchrun (CPU, gloo): scheduling, per-rank writers, merge, failures, resume.

Equality with a single-process run: ``index`` and ``target`` are compared exactly; the float fields
within rtol 1e-6 / atol 1e-7. Ranks cut the data at other places than one process does, so a
sample can sit in a batch of another size, and batched CPU kernels (matmul blocking) may then
round differently: on this small MLP the attributions and deltas came out bitwise equal, F(x)
differed in the last bit for some samples.
"""

from __future__ import annotations

import json
import os
import random
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
from fastattr.distributed import split_ranges
from fastattr.store import Block, RunMismatchError, RunWriter, StoreError, open_run, verify_run

pytestmark = pytest.mark.usefixtures("single_thread")

TORCHRUN = shutil.which("torchrun") or ""
FASTATTR = shutil.which("fastattr") or ""
needs_torchrun = pytest.mark.skipif(not TORCHRUN or not torch.distributed.is_available(), reason="torchrun / torch.distributed not available")

# ------------------------------------------------------------------------------------------------
# scheduling
# ------------------------------------------------------------------------------------------------


def test_split_is_contiguous_balanced_and_exact():
    rng = random.Random(0)
    cases = [([(0, 1001)], 2), ([(0, 1001)], 3), ([(0, 2)], 5), ([], 3), ([(5, 6)], 1)]
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 400), rng.randrange(0, 12) * 2))
        cases.append(([(a, b) for a, b in zip(cuts[::2], cuts[1::2])], rng.randrange(1, 9)))
    for ranges, world in cases:
        pieces = split_ranges(ranges, world)
        assert len(pieces) == world
        flat = [i for piece in pieces for a, b in piece for i in range(a, b)]  # rank order = index order
        assert flat == [i for a, b in ranges for i in range(a, b)]  # every sample once, none added
        sizes = [sum(b - a for a, b in piece) for piece in pieces]
        assert max(sizes) - min(sizes) <= 1
    assert split_ranges([(0, 1001)], 3) == [[(0, 333)], [(333, 667)], [(667, 1001)]]
    assert split_ranges([(0, 3), (10, 12), (20, 21)], 2) == [[(0, 3)], [(10, 12), (20, 21)]]


# ------------------------------------------------------------------------------------------------
# per-rank writers (in one process: each rank's writer has its own lock file)
# ------------------------------------------------------------------------------------------------

CONFIG = {"method": "saliency", "fingerprints": {"model": "m", "data": {"count": 0}}}


def block(start: int, stop: int) -> Block:
    idx = np.arange(start, stop)
    f = idx.astype(np.float32)
    return Block(
        start=start, stop=stop, attributions={"x": np.stack([f, -f], axis=1)}, target=idx % 3, output=f, baseline_output=f * 0,
        delta=f / 1000, n_steps=np.full(len(idx), 4, np.int32), stats={"sum": f, "l1": f, "l2": f, "absmax": f, "nonfinite": np.zeros(len(idx), np.int32)},
    )  # fmt: skip


def open_ranks(run: Path, world: int, total: int, **kw) -> list[RunWriter]:
    """What fastattr.run does under torchrun: rank 0 opens first, the others join its run."""
    w0 = RunWriter(run, config=CONFIG, total=total, shard_rows=16, rank=0, world_size=world, **kw)
    joined = [RunWriter(run, config=CONFIG, total=total, shard_rows=16, rank=r, world_size=world, run_id=w0.run_id, first_shard_id=w0.first_shard_id) for r in range(1, world)]
    return [w0, *joined]


def write_shares(writers: list[RunWriter], missing: list[tuple[int, int]], batch: int = 10) -> None:
    for w, share in zip(writers, split_ranges(missing, len(writers))):
        for a, b in share:
            for s in range(a, b, batch):
                w.put(block(s, min(s + batch, b)))


def check_run(run: Path, total: int) -> None:
    with open_run(run) as r:
        np.testing.assert_array_equal(r.indices, np.arange(total))
        got = r[:]
        np.testing.assert_array_equal(got["attributions"]["x"], block(0, total).attributions["x"])
        np.testing.assert_array_equal(got["target"], np.arange(total) % 3)


def test_rank_writers_merge_into_one_manifest_in_global_order(tmp_path):
    run, total = tmp_path / "run", 101
    writers = open_ranks(run, 3, total)
    write_shares(writers, [(0, total)])
    for w in writers[1:]:  # the other ranks close first; rank 0 merges their fragments
        w.close()
    assert sorted(p.name for p in run.glob("manifest.rank-*.json")) == ["manifest.rank-00001.json", "manifest.rank-00002.json"]
    writers[0].close()
    assert not list(run.glob("manifest.rank-*")) and writers[0].complete
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "complete"
    starts = [s["start"] for s in man["shards"]]
    assert starts == sorted(starts) and man["shards"][-1]["stop"] == total
    ids = [int(s["file"][len("shard-") : -len(".h5")]) for s in man["shards"]]
    assert len(set(ids)) == len(ids)
    for s, i in zip(man["shards"], ids):  # rank r names its shards r, r + 3, r + 6, ...
        owner = next(r for r, piece in enumerate(split_ranges([(0, total)], 3)) if piece[0][0] <= s["start"] < piece[-1][1])
        assert i % 3 == owner
    check_run(run, total)
    rep = verify_run(run)
    assert rep.ok and not rep.warnings, (rep.problems, rep.warnings)


def test_a_crashed_run_is_read_as_one_and_resumed_with_another_world_size(tmp_path):
    run, total = tmp_path / "run", 120
    writers = open_ranks(run, 3, total)
    shares = split_ranges([(0, total)], 3)
    for w, share in zip(writers, shares):  # each rank gets 20 of its 40 samples done
        a = share[0][0]
        w.put(block(a, a + 20))
    writers[2].put(block(shares[2][0][0] + 20, shares[2][0][0] + 25))  # left open: a .partial
    deadline = time.monotonic() + 10
    while any(len(w.covered) < 1 for w in writers) and time.monotonic() < deadline:  # first shards finalized
        time.sleep(0.01)
    writers[1].close()  # 16 + 4 rows
    writers[2].abort()  # killed: its finalized shard is listed in its fragment, the open rows are not
    writers[0].abort()  # rank 0 dies before merging
    assert (run / "manifest.rank-00001.json").exists() and (run / "manifest.rank-00002.json").exists()
    with open_run(run) as r:  # manifest.json plus the fragments: everything finalized, one run
        done = r.indices
    assert len(done) == 16 + 20 + 16
    rep = verify_run(run)
    assert rep.ok and any("rank fragments not merged" in w for w in rep.warnings), (rep.problems, rep.warnings)

    # resume with two ranks: rank 0 merges the fragments, the rest is split between two ranks
    writers = open_ranks(run, 2, total)
    assert not list(run.glob("manifest.rank-*")) and not list(run.glob("*.partial"))
    missing = writers[0].missing()
    assert sum(b - a for a, b in missing) == total - len(done)
    assert all(w.missing() == missing for w in writers)
    write_shares(writers, missing, batch=7)
    writers[1].close()
    writers[0].close()
    assert writers[0].complete
    check_run(run, total)
    rep = verify_run(run)
    assert rep.ok and not rep.warnings, (rep.problems, rep.warnings)
    # and a single process sees a complete run
    w = RunWriter(run, config=CONFIG, total=total, shard_rows=16)
    assert w.complete
    w.close()


def test_joining_ranks_refuse_what_is_not_their_run(tmp_path):
    run, total = tmp_path / "run", 20
    with pytest.raises(ValueError, match="run_id and first_shard_id"):
        RunWriter(run, config=CONFIG, total=total, rank=1, world_size=2)
    with pytest.raises(ValueError, match="only rank 0 may overwrite"):
        RunWriter(run, config=CONFIG, total=total, rank=1, world_size=2, run_id="x", first_shard_id=0, overwrite=True)
    with pytest.raises(StoreError, match="filesystem that every rank"):  # no manifest: not a shared directory
        RunWriter(tmp_path / "elsewhere", config=CONFIG, total=total, rank=1, world_size=2, run_id="x", first_shard_id=0)
    w0 = RunWriter(run, config=CONFIG, total=total, rank=0, world_size=2)
    with pytest.raises(StoreError, match="not run 'other'"):
        RunWriter(run, config=CONFIG, total=total, rank=1, world_size=2, run_id="other", first_shard_id=0)
    with pytest.raises(RunMismatchError, match="rank 1: its run differs from rank 0's in: fingerprints.model"):
        RunWriter(run, config={**CONFIG, "fingerprints": {"model": "m2", "data": {"count": 0}}}, total=total, rank=1, world_size=2, run_id=w0.run_id, first_shard_id=0)
    w1 = RunWriter(run, config=CONFIG, total=total, rank=1, world_size=2, run_id=w0.run_id, first_shard_id=w0.first_shard_id)
    with pytest.raises(StoreError, match="in use by another process writing as rank 1"):
        RunWriter(run, config=CONFIG, total=total, rank=1, world_size=2, run_id=w0.run_id, first_shard_id=0)
    w0.close()
    # a coordinator never merges or deletes while a rank of an earlier launch still writes
    with pytest.raises(StoreError, match="rank 1 of a distributed run still writes"):
        RunWriter(run, config=CONFIG, total=total)
    w1.close()
    RunWriter(run, config=CONFIG, total=total).close()


def test_fragments_of_another_run_are_ignored_and_removed(tmp_path):
    run, total = tmp_path / "run", 40
    writers = open_ranks(run, 2, total)
    write_shares(writers, [(0, total)])
    writers[1].close()
    writers[0].abort()  # rank 1's fragment stays
    w = RunWriter(run, config=CONFIG, total=total, overwrite=True)  # a new run: the fragment is not its
    assert not list(run.glob("manifest.rank-*")) and w.missing() == [(0, total)]
    w.put(block(0, total))
    w.close()
    check_run(run, total)
    # a stale fragment that survived (e.g. copied back) is not read as part of this run
    stale = {"schema_version": 1, "status": "running", "config": CONFIG, "total": total, "run_id": "old", "shards": [{"file": "shard-00000.h5", "start": 0, "stop": 16, "rows": 16, "sha256": "0" * 64}]}
    (run / "manifest.rank-00001.json").write_text(json.dumps(stale))
    assert verify_run(run).ok
    RunWriter(run, config=CONFIG, total=total).close()
    assert not (run / "manifest.rank-00001.json").exists()


# ------------------------------------------------------------------------------------------------
# torchrun, through subprocess
# ------------------------------------------------------------------------------------------------

JOB = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import numpy as np, torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()

    def features(n):
        return np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)

    class Slow(torch.utils.data.Dataset):
        # features(n), each item delayed (a run long enough to be killed), optionally failing at one index
        def __init__(self, n, delay=0.0, bad=-1):
            self.x, self.delay, self.bad = features(n), delay, bad
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            if i == self.bad:
                raise ValueError(f"corrupt record {i}")
            time.sleep(self.delay)
            return torch.from_numpy(self.x[i])

    def flaky():  # a data factory for the CLI
        return Slow(int(os.environ["JOB_N"]), float(os.environ["JOB_DELAY"]), int(os.environ["JOB_BAD"]))

    if __name__ == "__main__":
        import fastattr
        torch.set_num_threads(1)
        out, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.pid{os.environ.get('RANK', 0)}").write_text(str(os.getpid()))
        summary = fastattr.run(mlp(), Slow(n, delay), out, target="predicted", n_steps=8, shard_size=32, examples_per_batch=16, progress=False)
        print(f"rank {os.environ.get('RANK')}: " + " / ".join(summary.lines()), flush=True)
    """
)


@pytest.fixture
def job(tmp_path):
    (tmp_path / "dist_job.py").write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "FASTATTR_DIST_TIMEOUT": "120"}
    sys.path.insert(0, str(tmp_path))
    try:
        import dist_job

        yield tmp_path, env, dist_job
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dist_job", None)


def torchrun(nproc: int, *args: str, env: dict, cwd: Path, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, **popen)


def reference(dist_job, tmp_path: Path, n: int, **kw) -> dict:
    """The same attributions from one process, in this one."""
    out = tmp_path / f"ref-{n}"
    if not out.exists():
        fastattr.run(dist_job.mlp(), dist_job.features(n), out, target="predicted", n_steps=8, progress=False, **kw)
    return fastattr.open(out)[:]


def assert_same_samples(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["target"], want["target"])
    np.testing.assert_array_equal(got["n_steps"], want["n_steps"])
    for key in ("output", "baseline_output", "delta"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(got["attributions"]["x"], want["attributions"]["x"], rtol=1e-6, atol=1e-7)
    for key in got["stats"]:
        np.testing.assert_allclose(got["stats"][key], want["stats"][key], rtol=1e-6, atol=1e-7, err_msg=key)


@needs_torchrun
@pytest.mark.parametrize("nproc", [2, 3])
def test_cli_on_several_ranks_equals_one_process(job, nproc):
    tmp_path, env, dist_job = job
    n = 1001  # 500 + 501 and 333 + 334 + 334: uneven
    np.save(tmp_path / "x.npy", dist_job.features(n))
    cmd = [FASTATTR] if FASTATTR else [sys.executable, "-m", "fastattr"]
    r = torchrun(nproc, "--no-python", *cmd, "run", "--model", "dist_job:mlp", "--data", "x.npy", "--out", "runs/ig", "--steps", "8", "--shard-size", "64", env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("complete, 1001 samples") == 1, r.stdout  # rank 0 prints the job's summary
    assert "attributed 1001 samples" in r.stdout  # the global count, not rank 0's share
    run = tmp_path / "runs/ig"
    assert not list(run.glob("manifest.rank-*")) and not list(run.glob("*.partial"))
    rep = verify_run(run)
    assert rep.ok and not rep.warnings and rep.samples == n, (rep.problems, rep.warnings)
    store = fastattr.open(run)
    assert store.status == "complete" and len(store) == n
    assert_same_samples(store[:], reference(dist_job, tmp_path, n))
    if nproc == 2:  # a complete run is not recomputed, whatever the world size
        again = torchrun(3, "--no-python", *cmd, "run", "--model", "dist_job:mlp", "--data", "x.npy", "--out", "runs/ig", "--steps", "8", env=env, cwd=tmp_path)  # fmt: skip
        assert again.returncode == 0 and again.stdout.count("nothing to do") == 1, again.stdout + again.stderr


@needs_torchrun
def test_world_size_one_under_torchrun_is_a_plain_run(job):
    tmp_path, env, dist_job = job
    n = 100
    r = torchrun(1, "dist_job.py", "runs/one", str(n), "0", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    fastattr.run(dist_job.mlp(), dist_job.Slow(n), tmp_path / "plain", target="predicted", n_steps=8, shard_size=32, examples_per_batch=16, progress=False)
    one, plain = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("runs/one", "plain"))
    assert [(s["file"], s["start"], s["stop"]) for s in one["shards"]] == [(s["file"], s["start"], s["stop"]) for s in plain["shards"]]
    assert not list((tmp_path / "runs/one").glob(".fastattr-writer.rank-*"))  # no rank machinery at all
    got, want = fastattr.open(tmp_path / "runs/one")[:], fastattr.open(tmp_path / "plain")[:]
    np.testing.assert_array_equal(got["attributions"]["x"], want["attributions"]["x"])  # same batches: bitwise
    np.testing.assert_array_equal(got["output"], want["output"])


@needs_torchrun
def test_kill_a_rank_then_resume_with_another_world_size(job):
    tmp_path, env, dist_job = job
    n, run = 1001, tmp_path / "runs/kill"
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "dist_job.py", str(run), str(n), "0.01"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        fragment = run / "manifest.rank-00001.json"
        deadline = time.monotonic() + 90
        while not (fragment.exists() and json.loads(fragment.read_text())["shards"]):  # rank 1 finalized a shard
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(int(Path(f"{run}.pid1").read_text()), signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0, out + err  # torchrun stops the job when a rank dies
    with fastattr.open(run) as store:  # what the killed job left is one consistent, partial run
        before = store.indices
    assert 0 < len(before) < n
    assert verify_run(run).ok

    r = torchrun(3, "dist_job.py", str(run), str(n), "0", env=env, cwd=tmp_path)  # resume on 3 ranks
    assert r.returncode == 0, r.stdout + r.stderr
    assert "complete, 1001 samples" in r.stdout and f"attributed {n - len(before)} samples" in r.stdout, r.stdout
    store = fastattr.open(run)
    np.testing.assert_array_equal(store.indices, np.arange(n))  # every sample exactly once
    rep = verify_run(run)
    assert rep.ok and not rep.warnings, (rep.problems, rep.warnings)
    assert_same_samples(store[:], reference(dist_job, tmp_path, n))


@needs_torchrun
def test_a_rank_whose_data_raises_stops_the_job_with_its_error(job):
    tmp_path, env, _ = job
    # rank 1 (samples 500..1000) fails at 520, after about 0.6 s; rank 0's share takes >= 20 s
    env = {**env, "JOB_N": "1001", "JOB_DELAY": "0.04", "JOB_BAD": "520"}
    cmd = [FASTATTR] if FASTATTR else [sys.executable, "-m", "fastattr"]
    t0 = time.monotonic()
    r = torchrun(2, "--no-python", *cmd, "run", "--model", "dist_job:mlp", "--data", "dist_job:flaky", "--out", "runs/bad", "--steps", "4", env=env, cwd=tmp_path)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert "ValueError: corrupt record 520" in r.stderr and "(rank 1)" in r.stderr, r.stderr  # the failing rank names itself (a data error from user code keeps its traceback)
    report = r.stderr.partition("fastattr FAILED")[2]  # torchrun's failure report, from the recorded error file
    assert "rank      : 1" in report and "ValueError: corrupt record 520" in report, r.stderr
    with fastattr.open(tmp_path / "runs/bad") as store:
        assert len(store) < 500  # rank 0 stopped long before finishing its share
    assert elapsed < 60, elapsed


FAILING_RANKS = textwrap.dedent(
    """
    import sys, torch
    import fastattr
    from dist_job import Slow, mlp
    torch.set_num_threads(1)
    bad = 520 if sys.argv[2] == "1" else -1  # only rank 1's data is broken
    try:
        fastattr.run(mlp(), Slow(1001, 0.02, bad), sys.argv[1], n_steps=4, examples_per_batch=8, progress=False)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_without_a_launcher_the_other_ranks_stop_at_their_next_batch(job):
    """No torchrun agent to kill anyone: the ranks themselves must not hang. The process group is
    initialised by fastattr from the environment, as torchrun would set it."""
    tmp_path, env, _ = job
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "ranks.py").write_text(FAILING_RANKS)
    base = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    t0 = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "ranks.py", "runs/bad", str(r)], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - t0
    assert [p.returncode for p in procs] == [3, 3], outs
    assert outs[1][0].startswith("ValueError: corrupt record 520"), outs[1]
    assert "PeerFailedError: rank 0: stopped because rank 1: ValueError: corrupt record 520" in outs[0][0], outs[0]
    with fastattr.open(tmp_path / "runs/bad") as store:  # rank 0's share alone takes 10 s of reads
        assert len(store) < 500
    assert elapsed < 60, elapsed

