"""Distributed runs attacked with real processes and signals: ranks killed outright, with and
without a launcher. The job script and helpers are shared with tests/test_distributed.py."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import job  # noqa: F401 - the fixture that writes dist_job.py

import fastattr
from fastattr.distributed import split_ranges
from fastattr.store import verify_run

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
]

RANK = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    import fastattr
    from dist_job import Slow, mlp
    torch.set_num_threads(1)
    out, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.pid{os.environ['RANK']}").write_text(str(os.getpid()))
    try:
        fastattr.run(mlp(), Slow(n, delay), out, n_steps=4, shard_size=16, examples_per_batch=8, progress=False)
    except Exception as exc:
        import traceback; traceback.print_exc()
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    """
)


@contextlib.contextmanager
def launch_ranks(tmp_path: Path, env: dict, world: int, run: str, n: int, delay: float, script: str = RANK) -> Iterator[list[subprocess.Popen]]:
    """world ranks as plain processes (no torchrun agent to stop anyone): fastattr initialises the
    process group from the environment torchrun would set. Every rank is killed and reaped on leaving."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "rank.py").write_text(script)
    base = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen([sys.executable, "rank.py", run, str(n), str(delay)], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]  # fmt: skip
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def kill_after_first_shard(run: Path, procs: list[subprocess.Popen], victim: int) -> float:
    """SIGKILL rank ``victim`` once the run lists a finalized shard; returns the time of the kill."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with fastattr.open(run) as store:
                if len(store.indices):
                    break
        except Exception:  # noqa: S110 - not created yet
            pass
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [p.communicate() for p in procs]
        time.sleep(0.05)
    os.kill(int(Path(f"{run}.pid{victim}").read_text()), signal.SIGKILL)
    return time.monotonic()


def test_a_rank_killed_without_a_launcher_stops_the_others_at_once(job):  # noqa: F811
    """SIGKILL reports nothing: before the heartbeat rank 0 finished its whole share (20 s here)
    and then waited FASTATTR_DIST_TIMEOUT for the dead rank; now it stops within the silence limit
    (the timeout within 5 to 60 s, 5 s here) naming the rank, and what both finalized is one valid run."""
    tmp_path, env, dist_job = job
    env = {**env, "FASTATTR_DIST_TIMEOUT": "5"}
    n, run = 1001, tmp_path / "runs/killed"
    with launch_ranks(tmp_path, env, 2, "runs/killed", n, 0.04) as procs:  # rank 0's 500 samples take >= 20 s
        killed = kill_after_first_shard(run, procs, victim=1)
        out0, err0 = procs[0].communicate(timeout=60)
        stopped = time.monotonic() - killed
    assert procs[0].returncode == 3, out0 + err0
    assert "PeerFailedError: rank 0: stopped because rank 1: stopped responding (no heartbeat for" in out0, out0 + err0
    assert stopped < 14, stopped  # silence limit + one batch + a beat, with room for a loaded machine
    with fastattr.open(run) as store:
        done = store.indices
    assert 0 < len(done) < 500 + 16  # rank 0 did not finish its share; rank 1's finalized shards are kept
    rep = verify_run(run)
    assert rep.ok, rep.problems

    # and the rest on one process: every sample once, the same values as a plain run
    fastattr.run(dist_job.mlp(), dist_job.Slow(n), run, n_steps=4, shard_size=16, examples_per_batch=8, progress=False)
    with fastattr.open(run) as store:
        np.testing.assert_array_equal(store.indices, np.arange(n))
        got = store[:]
    ref = tmp_path / "ref"
    fastattr.run(dist_job.mlp(), dist_job.Slow(n), ref, n_steps=4, shard_size=16, examples_per_batch=8, progress=False)
    want = fastattr.open(ref)[:]
    np.testing.assert_array_equal(got["attributions"]["x"], want["attributions"]["x"])  # same batches of 8: bitwise
    np.testing.assert_array_equal(got["delta"], want["delta"])
    assert verify_run(run).ok


def test_a_rank_that_loses_the_store_stops_with_an_error_naming_it(job):  # noqa: F811
    """Without a launcher rank 0 hosts the store: killing it left rank 1 with torch's bare
    DistNetworkError; now a DistributedRunError says what was lost."""
    tmp_path, env, _ = job
    run = tmp_path / "runs/host"
    with launch_ranks(tmp_path, env, 2, "runs/host", 1001, 0.02) as procs:
        kill_after_first_shard(run, procs, victim=0)
        out1, err1 = procs[1].communicate(timeout=60)
    assert procs[1].returncode == 3, out1 + err1
    assert out1.startswith("DistributedRunError: rank 1: lost the connection to the job's store"), out1 + err1
    assert verify_run(run).ok


TORCHRUN = shutil.which("torchrun") or ""


@pytest.mark.skipif(not TORCHRUN, reason="torchrun not available")
def test_torchrun_report_names_the_rank_that_failed_not_one_it_stopped(job):  # noqa: F811
    """torchrun's report takes the smallest whole-second timestamp as the root cause, ties to the
    lowest rank: rank 2 failing at sample 700 and ranks 0 and 1 stopping on its flag within the same
    second made the report's root cause rank 0 (its PeerFailedError). The stopped ranks now
    record a second later."""
    tmp_path, env, _ = job
    env = {**env, "JOB_N": "1001", "JOB_DELAY": "0", "JOB_BAD": "700"}  # each rank's share is one quick batch
    cmd = [shutil.which("fastattr") or ""] if shutil.which("fastattr") else [sys.executable, "-m", "fastattr"]
    r = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=3", "--no-python", *cmd, "run", "--model", "dist_job:mlp", "--data", "dist_job:flaky", "--out", "runs/bad", "--steps", "4"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "fastattr: unexpected ValueError (rank 2)" in r.stderr, r.stderr
    report = r.stderr.partition("Root Cause (first observed failure):")[2]  # failed 3 of 3 tries on the old CLI
    assert report.split("rank      : ")[1].startswith("2 (local_rank: 2)"), r.stderr
    assert "ValueError: corrupt record 700" in report.split("rank      : ")[1], r.stderr
    assert verify_run(tmp_path / "runs/bad").ok


LOOKUP = RANK.replace("from dist_job import Slow, mlp", """from dist_job import Slow, mlp
class Slow(Slow):  # its error does not say which sample: fastattr must
    def __getitem__(self, i):
        if i == 700:
            raise KeyError("no such record")
        return super().__getitem__(i)""")


def test_a_dataset_error_that_does_not_name_its_sample_is_named_on_every_rank(job):  # noqa: F811
    """Rank 1's dataset raises KeyError('no such record') at sample 700: the error keeps its type
    and traceback, and rank 1's and the stopped rank 0's messages both name sample 700 (rank 0 said
    only 'stopped because rank 1: KeyError: 'no such record'')."""
    tmp_path, env, _ = job
    run = tmp_path / "runs/lookup"
    with launch_ranks(tmp_path, env, 2, "runs/lookup", 1001, 0.01, script=LOOKUP) as procs:
        outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs
    assert "KeyError: 'no such record'\nfastattr: raised by the dataset reading sample 700" in outs[1][1], outs[1]  # the traceback
    assert "PeerFailedError: rank 0: stopped because rank 1: KeyError: 'no such record' (fastattr: raised by the dataset reading sample 700)" in outs[0][0], outs[0]
    assert verify_run(run).ok


def test_split_on_a_batch_grid_keeps_every_sample_once_and_near_an_equal_share():
    rng = random.Random(1)
    cases = [([(0, 1001)], 3), ([(0, 2)], 5), ([], 3), ([(5, 6)], 1), ([(0, 40), (56, 1001)], 4)]
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, 600), rng.randrange(0, 10) * 2))
        cases.append(([(a, b) for a, b in zip(cuts[::2], cuts[1::2])], rng.randrange(1, 9)))
    for ranges, world in cases:
        total = sum(b - a for a, b in ranges)
        for granule in (1, 3, 16, 256):
            pieces = split_ranges(ranges, world, granule)
            assert [i for piece in pieces for a, b in piece for i in range(a, b)] == [i for a, b in ranges for i in range(a, b)]
            assert all(abs(sum(b - a for a, b in piece) - total / world) <= granule for piece in pieces)
            starts = {a for a, _ in ranges}
            for piece in pieces:  # every cut on the grid of its range, as one process walks it
                for a, _ in piece:
                    base = max(s for s in starts if s <= a)
                    assert (a - base) % granule == 0
    assert split_ranges([(0, 1001)], 3, 16) == [[(0, 336)], [(336, 672)], [(672, 1001)]]
    assert split_ranges([(0, 1001)], 3) == [[(0, 333)], [(333, 667)], [(667, 1001)]]  # granule 1: as before


FIXED_ROWS = textwrap.dedent(
    """
    import sys, torch
    import fastattr
    from dist_job import Slow, mlp
    torch.set_num_threads(1)
    fastattr.run(mlp(), Slow(int(sys.argv[2])), sys.argv[1], target="predicted", n_steps=8, shard_size=32, examples_per_batch=16, batch_size=32, progress=False)
    """
)


@pytest.mark.skipif(not TORCHRUN, reason="torchrun not available")
def test_three_ranks_with_a_fixed_batch_size_equal_one_process_bit_for_bit(job):  # noqa: F811
    """Ranks cut at 333 and 667 computed the samples around the cuts in smaller batches than one
    process does (its batches of 16 start at multiples of 16), and CPU kernels round by batch
    shape: 40 of 1001 attributions differed in the last bits. Shares are now cut on the batch
    grid when batch_size is fixed on CPU, so every batch is the one a single process computes."""
    tmp_path, env, _ = job
    (tmp_path / "fixed.py").write_text(FIXED_ROWS)
    n = 1001
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=3", "fixed.py", "runs/three", str(n)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    one = subprocess.run([sys.executable, "fixed.py", "runs/one", str(n)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert one.returncode == 0, one.stdout + one.stderr
    got, want = fastattr.open(tmp_path / "runs/three")[:], fastattr.open(tmp_path / "runs/one")[:]
    np.testing.assert_array_equal(got["index"], np.arange(n))
    for key in ("target", "output", "baseline_output", "delta", "n_steps"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_array_equal(got["attributions"]["x"], want["attributions"]["x"])
    for key in got["stats"]:
        np.testing.assert_array_equal(got["stats"][key], want["stats"][key], err_msg=key)
    rep = verify_run(tmp_path / "runs/three")
    assert rep.ok and not rep.warnings, (rep.problems, rep.warnings)


TWO_RUNS = textwrap.dedent(
    """
    import os, sys, torch
    import fastattr
    from dist_job import features, mlp
    torch.set_num_threads(1)
    for out in sys.argv[1:]:
        s = fastattr.run(mlp(), features(101), out, n_steps=4, shard_size=16, batch_size=32, examples_per_batch=8, progress=False)
        print(f"rank {os.environ['RANK']}: {s.lines()[0]}", flush=True)
    """
)


@pytest.mark.skipif(not TORCHRUN, reason="torchrun not available")
def test_a_script_runs_several_runs_under_one_torchrun(job):  # noqa: F811
    """The first run() destroyed the process group it had initialised; the second initialised a
    new one against the first one's rendezvous keys and died ("Gloo connectFullMesh failed ...
    Connection refused"). The group now lives until the process exits and later runs reuse it."""
    tmp_path, env, _ = job
    (tmp_path / "two.py").write_text(TWO_RUNS)
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "two.py", "runs/a", "runs/b", "runs/a"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert r.stdout.count(f"rank {rank}: runs/a: complete, 101 samples") == 2 and f"rank {rank}: runs/b: complete, 101 samples" in r.stdout, r.stdout
    for run in ("runs/a", "runs/b"):
        rep = verify_run(tmp_path / run)
        assert rep.ok and rep.samples == 101 and not rep.warnings, (rep.problems, rep.warnings)


RANK0_ONLY = RANK.replace(
    "    fastattr.run(",
    """    torch.distributed.init_process_group("gloo")  # a training script's group
    if os.environ["RANK"] != "0":  # that attributes on rank 0 only
        import time; time.sleep(60)
    fastattr.run(""",
)


def test_a_run_called_on_rank_0_only_fails_soon_saying_why(job):  # noqa: F811
    """A training script's `if rank == 0: fastattr.run(...)`: rank 0 computed half the data and then
    waited FASTATTR_DIST_TIMEOUT (30 min by default) for a rank that never came, to fail with 'a
    rank may have died'. It now stops during its share once the timeout passes (a rank that never beat
    gets the full timeout: ranks of a script's own group may reach run() far apart), saying every
    rank must call run."""
    tmp_path, env, _ = job
    env = {**env, "FASTATTR_DIST_TIMEOUT": "5"}
    with launch_ranks(tmp_path, env, 2, "runs/alone", 1001, 0.02, script=RANK0_ONLY) as procs:  # rank 0's half: >= 10 s of reads
        t0 = time.monotonic()
        out0, err0 = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - t0
    assert procs[0].returncode == 3, out0 + err0
    assert "rank 1: never joined this run within 5 s: every rank of the job must call fastattr.run" in out0, out0 + err0
    assert elapsed < 12, elapsed
    assert verify_run(tmp_path / "runs/alone").ok
