"""fastattr.store: shard round trips, plain-h5py readability, resume, crash safety (SIGKILL at
random moments), bad input, and the single-thread / bounded-queue writer."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from fastattr import store
from fastattr.store import (
    STAT_FIELDS,
    Block,
    RunMismatchError,
    RunWriter,
    StoreError,
    open_run,
    verify_run,
)
from fastattr.store.schema import GZIP_LEVEL

# The deterministic data below counts non-finite values (stats/nonfinite) in every third sample, so
# the runs allow them: verify reports them as counted facts instead of failing (test_store_trust.py).
CONFIG = {"method": "integrated_gradients", "n_steps": 8, "fingerprints": {"model": "m0", "data": {"count": 0}}, "allow_nonfinite": True}

# Deterministic data: every field is a function of the global index, so a run rebuilt across
# crashes and resumes can be checked value by value. Shared (as source) with the crash subprocess.
BLOCK_SRC = """
import numpy as np

SHAPES = {"x": (3, 4), "layer.conv": (5,)}


def expected(i, name):
    i = np.asarray(i, dtype=np.float32)
    shape = SHAPES[name]
    base = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    scale = 0.5 if name == "x" else 0.25
    return (base * scale + i.reshape(i.shape + (1,) * len(shape))).astype(np.float32)


def make_block(Block, start, stop, k=0):
    i = np.arange(start, stop)
    f = i.astype(np.float32)
    return Block(
        start=start,
        stop=stop,
        attributions={name: expected(i, name) for name in SHAPES},
        target=(i % 7) if k == 0 else np.stack([i % 7 + j for j in range(k)], axis=1),
        output=f * 2.0,
        baseline_output=f - 1.0,
        delta=(f % 5) * 1e-3 - 2e-3,
        n_steps=(i % 4 + 1).astype(np.int32),
        stats={"sum": f + 0.5, "l1": f + 1.5, "l2": f + 2.5, "absmax": f + 3.5, "nonfinite": (i % 3 == 0).astype(np.int32)},
    )
"""
_ns: dict = {}
exec(BLOCK_SRC, _ns)
SHAPES, expected, make_block = _ns["SHAPES"], _ns["expected"], _ns["make_block"]


def block(start: int, stop: int, k: int = 0) -> Block:
    return make_block(Block, start, stop, k)


def write_run(run_dir, sizes, *, total=None, shard_rows=16, k=0, **kw) -> RunWriter:
    total = sum(sizes) if total is None else total
    w = RunWriter(run_dir, config=CONFIG, total=total, shard_rows=shard_rows, **kw)
    pos = 0
    for n in sizes:
        w.put(block(pos, pos + n, k))
        pos += n
    w.close()
    return w


def check_values(data: dict, idx: np.ndarray, *, k: int = 0, rtol: float = 0.0) -> None:
    """A reader's slice/batch dict against the deterministic data for global indices idx."""
    np.testing.assert_array_equal(data["index"], idx)
    ref = block(0, 1, k)  # for dtypes only
    want = make_block(Block, 0, int(idx.max()) + 1 if idx.size else 1, k)
    for name in SHAPES:
        np.testing.assert_allclose(data["attributions"][name], want.attributions[name][idx], rtol=rtol, atol=0)
    np.testing.assert_array_equal(data["target"], want.target[idx])
    for name in ("output", "baseline_output", "delta", "n_steps"):
        np.testing.assert_array_equal(data[name], getattr(want, name)[idx])
        assert data[name].dtype == getattr(ref, name).dtype
    for name in (*STAT_FIELDS, "nonfinite"):
        np.testing.assert_array_equal(data["stats"][name], want.stats[name][idx])


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["auto", "lzf", "gzip", "none"])
@pytest.mark.parametrize("k", [0, 2])
def test_round_trip(tmp_path, compression, k):
    sizes = [7, 9, 13, 5, 16, 3]  # 53 rows in shards of 16: blocks straddle shard boundaries
    w = write_run(tmp_path / "run", sizes, compression=compression, k=k)
    assert w.complete and w.covered == [(0, 53)] and w.missing() == []
    with open_run(tmp_path / "run") as r:
        assert len(r) == 53 and r.total == 53
        assert r.attribution_names == ["x", "layer.conv"]
        np.testing.assert_array_equal(r.indices, np.arange(53))
        meta = r.metadata
        assert meta["method"] == CONFIG["method"] and meta["fingerprints"] == CONFIG["fingerprints"]
        assert meta["status"] == "complete" and meta["total"] == 53
        assert [(s["start"], s["stop"]) for s in meta["shards"]] == [(0, 16), (16, 32), (32, 48), (48, 53)]
        check_values(r[:], np.arange(53), k=k)
        check_values(r[10:40], np.arange(10, 40), k=k)  # across three shards
        check_values(r[3:50:7], np.arange(3, 50, 7), k=k)
        check_values(r[-5:], np.arange(48, 53), k=k)
        one = r[17]
        assert one["index"] == 17 and one["attributions"]["x"].shape == (3, 4)
        np.testing.assert_array_equal(one["attributions"]["layer.conv"], expected(np.array(17), "layer.conv"))
        assert r[-1]["index"] == 52
        assert float(one["output"]) == 34.0 and int(one["stats"]["nonfinite"]) == 0
        np.testing.assert_array_equal(r.field("delta"), block(0, 53).delta)
        np.testing.assert_array_equal(r.field("stats/l1"), block(0, 53).stats["l1"])
        batches = list(r.iter_batches(batch_size=10))
        assert max(len(b["index"]) for b in batches) == 10
        np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(53))
        assert [s["index"] for s in r][:3] == [0, 1, 2]
        empty = r[5:5]
        assert empty["attributions"]["x"].shape == (0, 3, 4)
        with pytest.raises(IndexError):
            r[53]
    rep = verify_run(tmp_path / "run")
    assert rep.ok, rep.problems
    assert rep.samples == rep.total == 53 and rep.shards == 4
    assert rep.nonfinite == int(block(0, 53).stats["nonfinite"].sum())
    d = np.abs(block(0, 53).delta.astype(np.float64))
    assert rep.max_abs_delta == pytest.approx(d.max()) and rep.median_abs_delta == pytest.approx(np.median(d))


def test_float16_storage(tmp_path):
    write_run(tmp_path / "run", [20, 20], storage_dtype="float16", shard_rows=32)
    with h5py.File(tmp_path / "run" / "shard-00000.h5", "r") as f:
        assert f["attributions/x"].dtype == np.float16
        assert f["output"].dtype == np.float32  # only attributions use the storage dtype
    with open_run(tmp_path / "run") as r:
        check_values(r[:], np.arange(40), rtol=2**-11)
        assert r[0]["attributions"]["x"].dtype == np.float16


def test_extras_round_trip_and_resume(tmp_path):
    """Per-sample extra fields (e.g. token lengths) are stored as extras/<name>, read back per
    sample and by field(), and must keep their names, shapes and dtypes across blocks and resumes."""
    run = tmp_path / "run"

    def with_lengths(start: int, stop: int, dtype=np.int32) -> Block:
        b = block(start, stop)
        b.extras = {"lengths": (np.arange(start, stop) % 11 + 1).astype(dtype)}
        return b

    w = RunWriter(run, config=CONFIG, total=40, shard_rows=16)
    w.put(with_lengths(0, 20))
    with pytest.raises(ValueError, match="extras"):
        w.put(block(20, 25))  # no lengths in a run that stores them
    with pytest.raises(ValueError, match="extras"):
        w.put(with_lengths(20, 25, np.float32))
    w.close(complete=False)
    w = RunWriter(run, config=CONFIG, total=40, shard_rows=16)
    with pytest.raises(ValueError, match="extras"):
        w.put(block(w.missing()[0][0], 40))
    w.put(with_lengths(w.missing()[0][0], 40))
    w.close()
    with open_run(run) as r:
        np.testing.assert_array_equal(r.field("extras/lengths"), np.arange(40) % 11 + 1)
        assert r[13]["extras"]["lengths"] == 13 % 11 + 1
        np.testing.assert_array_equal(r[5:9]["extras"]["lengths"], np.arange(5, 9) % 11 + 1)
        check_values(r[:], np.arange(40))
    with h5py.File(run / "shard-00000.h5", "r") as f:
        assert f["extras/lengths"].dtype == np.int32 and f["extras/lengths"].shape == (16,)
    with open_run(tmp_path / "plain" if write_run(tmp_path / "plain", [10]) else None) as r:
        assert r[0]["extras"] == {}


def test_chunks_and_layout(tmp_path):
    write_run(tmp_path / "run", [40], shard_rows=32, compression="gzip")
    with h5py.File(tmp_path / "run" / "shard-00000.h5", "r") as f:
        x = f["attributions/x"]
        assert x.chunks[1:] == (3, 4) and 1 <= x.chunks[0] <= 32
        assert x.compression == "gzip" and x.compression_opts == GZIP_LEVEL and x.shuffle
        assert x.maxshape[0] is None


def test_chunk_rows_rule(tmp_path):
    w = RunWriter(tmp_path / "run", config=CONFIG, total=1, shard_rows=100000)
    try:
        for shape in [(3, 224, 224), (10,), (1000,), (3, 32, 32), (512, 512)]:
            rows = w._layout.chunk_rows(shape)
            chunk_bytes = rows * int(np.prod(shape)) * 4
            assert rows >= 1
            assert 64 * 1024 <= chunk_bytes <= 1024 * 1024 or rows == 1
    finally:
        w.abort()


PLAIN_H5PY = r"""
import json, sys
import h5py, numpy as np
out = []
for path in sys.argv[1:]:
    with h5py.File(path, "r") as f:
        a = dict(f.attrs)
        rec = {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in a.items()}
        rec["names"] = list(f["attributions"])
        rec["sums"] = {}
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                rec["sums"][name] = [float(np.asarray(data, np.float64).sum()), list(obj.shape), str(obj.dtype)]
        f.visititems(visit)
        out.append(rec)
assert not any(m == "fastattr" or m.startswith("fastattr.") for m in sys.modules), "fastattr was imported"
print(json.dumps(out))
"""


@pytest.mark.parametrize("compression", ["auto", "lzf", "gzip"])
def test_plain_h5py_reads_shards(tmp_path, compression):
    write_run(tmp_path / "run", [10, 12, 8], shard_rows=16, compression=compression, storage_dtype="float16")
    files = sorted(str(p) for p in (tmp_path / "run").glob("shard-*.h5"))
    res = subprocess.run([sys.executable, "-c", PLAIN_H5PY, *files], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    recs = json.loads(res.stdout)
    assert len(recs) == 2
    for sid, (rec, (a, b)) in enumerate(zip(recs, [(0, 16), (16, 30)])):
        assert rec["schema_version"] == 2 and rec["method"] == CONFIG["method"] and len(rec["run_id"]) == 32
        assert rec["shard_id"] == sid and rec["start"] == a and rec["stop"] == b
        assert json.loads(rec["config_json"]) == CONFIG
        assert rec["names"] == ["x", "layer.conv"]
        want = block(a, b, 0)
        rows = b - a
        expect = {
            "index": (np.arange(a, b), "int64"),
            "target": (want.target, "int64"),
            "output": (want.output, "float32"),
            "baseline_output": (want.baseline_output, "float32"),
            "delta": (want.delta, "float32"),
            "n_steps": (want.n_steps, "int32"),
            **{f"stats/{s}": (want.stats[s], "float32") for s in STAT_FIELDS},
            "stats/nonfinite": (want.stats["nonfinite"], "int32"),
            **{f"attributions/{n}": (want.attributions[n].astype(np.float16), "float16") for n in SHAPES},
        }
        assert set(rec["sums"]) == set(expect)
        for name, (arr, dtype) in expect.items():
            total, shape, got_dtype = rec["sums"][name]
            assert shape[0] == rows and tuple(shape) == arr.shape and got_dtype == dtype, name
            assert total == pytest.approx(float(arr.astype(np.float64).sum()), rel=1e-6), name


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------


def test_resume_fills_the_rest(tmp_path):
    run = tmp_path / "run"
    w = RunWriter(run, config=CONFIG, total=250, shard_rows=32)
    for a in range(0, 100, 25):
        w.put(block(a, a + 25))
    w.close()
    assert not w.complete
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    with open_run(run) as r:
        assert len(r) == 100 and r.status == "stopped"  # closed early: no writer holds the run
        with pytest.raises(KeyError, match=r"\[100, 120\)"):
            r[90:120]
        with pytest.raises(KeyError):
            r[150]
    w = RunWriter(run, config={**CONFIG, "created": "another time"}, total=250, shard_rows=32)
    assert w.covered == [(0, 100)] and w.missing() == [(100, 250)] and not w.complete
    with pytest.raises(ValueError, match="overlaps"):
        w.put(block(90, 110))
    for a, b in w.missing():
        for s in range(a, b, 30):
            w.put(block(s, min(s + 30, b)))
    w.close()
    assert w.complete
    with open_run(run) as r:
        check_values(r[:], np.arange(250))
        starts = [s["start"] for s in r.metadata["shards"]]
        assert starts == sorted(starts)
    assert verify_run(run).ok


def test_resume_with_gaps(tmp_path):
    run = tmp_path / "run"
    w = RunWriter(run, config=CONFIG, total=200, shard_rows=64)
    w.put(block(0, 50))
    w.put(block(100, 150))  # not contiguous: the open shard is finalized first
    w.close()
    assert w.covered == [(0, 50), (100, 150)]
    w = RunWriter(run, config=CONFIG, total=200, shard_rows=64)
    assert w.missing() == [(50, 100), (150, 200)]
    w.put(block(150, 200))
    w.put(block(50, 100))
    w.close()
    assert w.complete and w.covered == [(0, 200)]
    with open_run(run) as r:
        check_values(r[:], np.arange(200))
        assert [s["file"] for s in r.metadata["shards"]] == ["shard-00000.h5", "shard-00003.h5", "shard-00001.h5", "shard-00002.h5"]
    rep = verify_run(run)
    assert rep.ok and rep.samples == 200


def test_resume_mismatch_and_modes(tmp_path):
    run = tmp_path / "run"
    write_run(run, [30], total=60)
    other = {**CONFIG, "n_steps": 16, "fingerprints": {"model": "m1", "data": {"count": 0}}}
    with pytest.raises(RunMismatchError, match=r"fingerprints\.model.*n_steps|n_steps"):
        RunWriter(run, config=other, total=60)
    with pytest.raises(RunMismatchError, match="total"):
        RunWriter(run, config=CONFIG, total=61)
    with pytest.raises(StoreError, match="resume=True or overwrite=True"):
        RunWriter(run, config=CONFIG, total=60, resume=False)
    # nothing was touched by the refused opens
    w = RunWriter(run, config=CONFIG, total=60)
    assert w.covered == [(0, 30)]
    w.close()


def test_overwrite_starts_fresh(tmp_path):
    run = tmp_path / "run"
    write_run(run, [30, 30])
    (run / "shard-00007.h5.partial").write_bytes(b"junk")  # not provably fastattr's: kept
    w = RunWriter(run, config={**CONFIG, "n_steps": 99}, total=10, overwrite=True)
    assert w.covered == [] and w.missing() == [(0, 10)]
    assert [p.name for p in run.glob("shard-*")] == ["shard-00007.h5.partial"], list(run.iterdir())
    w.put(block(0, 10))
    w.close()
    with open_run(run) as r:
        assert r.metadata["n_steps"] == 99 and len(r) == 10
        assert r.metadata["shards"][0]["file"] == "shard-00008.h5"  # above every existing shard name


def test_complete_run_reopens_complete(tmp_path):
    run = tmp_path / "run"
    write_run(run, [20])
    w = RunWriter(run, config=CONFIG, total=20)
    assert w.complete and w.missing() == []
    w.close()
    assert w.complete


def test_orphan_shard_is_not_trusted(tmp_path):
    """A shard renamed but not yet listed (killed between rename and manifest) is deleted on
    reopen and its rows are written again."""
    run = tmp_path / "run"
    write_run(run, [16], total=32)
    (run / "shard-00001.h5").write_bytes((run / "shard-00000.h5").read_bytes())
    with open_run(run) as r:
        assert len(r) == 16
    assert any("shard-00001.h5" in w for w in verify_run(run).warnings)
    w = RunWriter(run, config=CONFIG, total=32)
    assert not (run / "shard-00001.h5").exists() and w.missing() == [(16, 32)]
    w.put(block(16, 32))
    w.close()
    with open_run(run) as r:
        check_values(r[:], np.arange(32))


def test_context_manager_aborts_on_error(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"), RunWriter(run, config=CONFIG, total=100, shard_rows=16) as w:
        w.put(block(0, 20))  # one full shard + 4 rows in an open shard
        time.sleep(0.2)
        raise RuntimeError("boom")
    man = json.loads((run / "manifest.json").read_text())
    assert [s["file"] for s in man["shards"]] in ([], ["shard-00000.h5"])
    w = RunWriter(run, config=CONFIG, total=100, shard_rows=16)
    assert not list(run.glob("*.partial"))
    assert w.covered in ([], [(0, 16)])
    w.abort()


def test_reader_sees_finalized_shards_of_a_run_in_progress(tmp_path):
    run = tmp_path / "run"
    w = RunWriter(run, config=CONFIG, total=100, shard_rows=16)
    w.put(block(0, 40))  # two shards finalized, 8 rows still open
    deadline = time.monotonic() + 10
    while w.covered != [(0, 32)] and time.monotonic() < deadline:
        time.sleep(0.01)
    with open_run(run) as r:
        assert len(r) == 32 and r.status == "running"
        check_values(r[:], np.arange(32))
    w.close()
    assert w.covered == [(0, 40)] and not w.complete


def test_max_shard_seconds(tmp_path):
    w = RunWriter(tmp_path / "run", config=CONFIG, total=100, shard_rows=64, max_shard_seconds=1e-6)
    w.put(block(0, 10))
    w.put(block(10, 20))
    w.close()
    assert len(json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"]) == 2


def test_one_writer_per_directory(tmp_path):
    w = RunWriter(tmp_path / "run", config=CONFIG, total=10)
    with pytest.raises(StoreError, match="in use"):
        RunWriter(tmp_path / "run", config=CONFIG, total=10)
    w.close()
    RunWriter(tmp_path / "run", config=CONFIG, total=10).close()


# ------------------------------------------------------------------------------------------------
# crash safety
# ------------------------------------------------------------------------------------------------

# The child prints "ready" after its imports, so the random kill delay starts once it can write.
CRASH_SCRIPT = (
    r"""
import sys, time
import fastattr.store as store
"""
    + BLOCK_SRC
    + r"""
run_dir, total, throttle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
config = {"method": "integrated_gradients", "n_steps": 8, "fingerprints": {"model": "m0", "data": {"count": 0}}, "allow_nonfinite": True}
print("ready", flush=True)
w = store.RunWriter(run_dir, config=config, total=total, shard_rows=8, queue_size=2, resume=True)
for a, b in w.missing():
    for s in range(a, b, 5):
        w.put(make_block(store.Block, s, min(s + 5, b)))
        time.sleep(throttle)
w.close()
print("done", flush=True)
"""
)


def test_sigkill_at_random_moments(tmp_path):
    run = tmp_path / "run"
    total = 3000
    rng = random.Random(1234)
    progress = 0
    saw_partial = 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_SCRIPT, str(run), str(total), "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed: raise total"
        if not (run / "manifest.json").exists():
            continue  # killed before the first manifest was written
        saw_partial += bool(list(run.glob("*.partial")))

        # what a killed run leaves must be trustworthy as it stands ...
        rep = verify_run(run)
        assert rep.ok, rep.problems
        with open_run(run) as r:
            covered = r.indices
            if len(r):
                check_values(r[:], np.arange(len(r)))
        # ... and reopening cleans it up
        w = RunWriter(run, config=CONFIG, total=total, shard_rows=8)
        try:
            assert not list(run.glob("*.partial"))
            assert w.covered in ([], [(0, len(covered))])  # a prefix made of whole shards
            assert len(covered) % 8 == 0 and len(covered) >= progress
            progress = len(covered)
        finally:
            w.close()
    assert progress > 0, "no shard was ever finalized: the kills came too early"

    # finish the run in this process (bigger shards: shard_rows is not part of the run's identity):
    # every index exactly once, with the expected data
    w = RunWriter(run, config=CONFIG, total=total, shard_rows=512)
    for a, b in w.missing():
        for s in range(a, b, 50):
            w.put(block(s, min(s + 50, b)))
    w.close()
    assert w.complete
    rep = verify_run(run)
    assert rep.ok and rep.samples == total, rep.problems
    with open_run(run) as r:
        np.testing.assert_array_equal(r.indices, np.arange(total))
        check_values(r[:], np.arange(total))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_truncated_shard(tmp_path):
    run = tmp_path / "run"
    write_run(run, [40], shard_rows=16)
    path = run / "shard-00001.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    with pytest.raises(StoreError, match="shard-00001.h5"):
        open_run(run)
    rep = verify_run(run)
    assert not rep.ok
    assert any("shard-00001.h5" in p and "checksum" in p for p in rep.problems)


def test_flipped_byte_is_a_checksum_problem(tmp_path):
    run = tmp_path / "run"
    write_run(run, [20], shard_rows=16)
    path = run / "shard-00000.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    rep = verify_run(run)
    assert not rep.ok and "checksum" in rep.problems[0]


def test_missing_shard_file(tmp_path):
    run = tmp_path / "run"
    write_run(run, [40], shard_rows=16)
    (run / "shard-00002.h5").unlink()
    with pytest.raises(StoreError, match="shard-00002.h5"):
        open_run(run)
    assert any("shard-00002.h5" in p for p in verify_run(run).problems)
    w = RunWriter(run, config=CONFIG, total=40)  # resume drops the missing shard: its samples are due again
    assert w.missing() == [(32, 40)]
    w.abort()


def test_corrupt_manifest(tmp_path):
    run = tmp_path / "run"
    write_run(run, [20])
    text = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="manifest.json"):
        open_run(run)
    with pytest.raises(StoreError, match="manifest.json"):
        RunWriter(run, config=CONFIG, total=20)
    assert not verify_run(run).ok
    RunWriter(run, config=CONFIG, total=20, overwrite=True).close()  # overwrite recovers
    assert len(open_run(run)) == 0


def test_manifest_overlap_and_schema(tmp_path):
    run = tmp_path / "run"
    write_run(run, [32], shard_rows=16)
    man = json.loads((run / "manifest.json").read_text())
    man["shards"][1]["start"], man["shards"][1]["stop"] = 8, 24
    (run / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="overlap"):
        open_run(run)
    assert any("duplicate" in p for p in verify_run(run).problems)
    man["schema_version"] = 3
    (run / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="schema_version"):
        open_run(run)


def test_no_manifest(tmp_path):
    with pytest.raises(StoreError, match="manifest"):
        open_run(tmp_path)


def test_unwritable_directory(tmp_path):
    # a path below a regular file can never be created (works as root too)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="file"):
        RunWriter(tmp_path / "file" / "run", config=CONFIG, total=10)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            RunWriter(ro, config=CONFIG, total=10)
    finally:
        ro.chmod(0o700)


def test_unwritable_directory_simulated(tmp_path, monkeypatch):
    """The writability probe, exercised as any user (root bypasses chmod)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(store.fsutil.tempfile, "mkstemp", refuse)
    with pytest.raises(StoreError, match="not writable"):
        RunWriter(tmp_path / "run", config=CONFIG, total=10)


def test_bad_arguments(tmp_path):
    for kw in ({"storage_dtype": "bfloat16"}, {"compression": "blosc"}, {"shard_rows": 0}, {"queue_size": 0}):
        with pytest.raises(ValueError):
            RunWriter(tmp_path / "run", config=CONFIG, total=10, **kw)
    with pytest.raises(ValueError, match="JSON"):
        RunWriter(tmp_path / "run2", config={"f": object()}, total=10)


def test_bad_blocks_raise_in_the_caller(tmp_path):
    w = RunWriter(tmp_path / "run", config=CONFIG, total=100)
    b = block(0, 10)
    b.delta = b.delta[:5]
    with pytest.raises(ValueError, match="delta"):
        w.put(b)
    b = block(0, 10)
    del b.stats["l2"]
    with pytest.raises(ValueError, match="stats"):
        w.put(b)
    with pytest.raises(ValueError, match="inside"):
        w.put(block(95, 105))
    w.put(block(0, 10))
    b = block(10, 20)
    b.attributions["x"] = np.zeros((10, 4, 3), np.float32)
    with pytest.raises(ValueError, match="attributions/x"):
        w.put(b)
    b = block(10, 20, k=2)
    with pytest.raises(ValueError, match="target"):
        w.put(b)
    w.put(block(10, 20))
    w.close(complete=False)
    w.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        w.put(block(20, 30))
    # the shapes of a resumed run are enforced too
    w = RunWriter(tmp_path / "run", config=CONFIG, total=100)
    b = block(20, 30)
    b.attributions["layer.conv"] = np.zeros((10, 6), np.float32)
    with pytest.raises(ValueError, match="layer.conv"):
        w.put(b)
    w.abort()


def test_writer_thread_error_surfaces(tmp_path, monkeypatch):
    def failing_append(self, blk, lo, hi):
        raise OSError("disk on fire")

    monkeypatch.setattr(store.shard.OpenShard, "append", failing_append)
    run = tmp_path / "run"
    w = RunWriter(run, config=CONFIG, total=1000, shard_rows=16)
    w.put(block(0, 10))
    with pytest.raises(StoreError, match="disk on fire") as info:
        for a in range(10, 1000, 10):
            w.put(block(a, a + 10))
            time.sleep(0.01)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(StoreError, match="disk on fire"):
        w.close()
    with pytest.raises(StoreError):
        w.close()  # still failed
    monkeypatch.undo()
    w = RunWriter(run, config=CONFIG, total=1000, shard_rows=16)
    assert w.covered == [] and not list(run.glob("*.partial"))
    w.abort()


def test_error_in_finalize_surfaces_on_close(tmp_path, monkeypatch):
    def failing_fsync(path):
        raise OSError("fsync refused")

    run = tmp_path / "run"
    w = RunWriter(run, config=CONFIG, total=20, shard_rows=16)
    monkeypatch.setattr(store.fsutil, "fsync_path", failing_fsync)
    w.put(block(0, 5))
    with pytest.raises(StoreError, match="fsync refused"):
        w.close()
    monkeypatch.undo()
    assert json.loads((run / "manifest.json").read_text())["shards"] == []


# ------------------------------------------------------------------------------------------------
# threading and backpressure
# ------------------------------------------------------------------------------------------------


def test_one_thread_and_bounded_queue(tmp_path, monkeypatch):
    gate = threading.Event()
    real_write = RunWriter._write_block

    def slow_write(self, blk):
        gate.wait(10)
        real_write(self, blk)

    monkeypatch.setattr(RunWriter, "_write_block", slow_write)
    before = {t.ident for t in threading.enumerate()}
    w = RunWriter(tmp_path / "run", config=CONFIG, total=100, shard_rows=16, queue_size=2)
    new = [t for t in threading.enumerate() if t.ident not in before]
    assert len(new) == 1 and new[0].daemon
    assert w.queue_maxsize == 2 and w._queue.maxsize == 2

    # the thread holds one block (stuck in the slow write), the queue two more; the next put blocks
    w.put(block(0, 10))
    w.put(block(10, 20))
    w.put(block(20, 30))
    done = threading.Event()
    blocked = threading.Thread(target=lambda: (w.put(block(30, 40)), done.set()))
    blocked.start()
    time.sleep(0.3)
    assert not done.is_set(), "put() did not block on a full queue"
    assert w._queue.qsize() <= 2
    gate.set()
    blocked.join(10)
    assert done.is_set()
    w.close(complete=False)
    assert w.covered == [(0, 40)]
    assert not new[0].is_alive()


def test_commit_overlaps_the_next_shard_and_lists_in_order(tmp_path, monkeypatch):
    """A full shard is sealed by the writer thread and committed (fsync, rename, sha256, listed) by
    a commit thread while the writer fills the next shard. Fails on the old writer, which committed
    inline: there the first commit waits for a write that cannot happen until it returns."""
    next_written = threading.Event()
    real_hash, real_append = store.fsutil.sha256_file, store.shard.OpenShard.append
    order: list[str] = []

    def sha256_file(path):
        if path.name.endswith("00000.h5"):
            assert next_written.wait(20), "the writer did not fill the next shard while the first was committed"
        order.append(path.name)
        return real_hash(path)

    def append(self, blk, lo, hi):
        real_append(self, blk, lo, hi)
        if self.start == 16:
            next_written.set()

    monkeypatch.setattr(store.fsutil, "sha256_file", sha256_file)
    monkeypatch.setattr(store.shard.OpenShard, "append", append)
    w = write_run(tmp_path / "run", [8] * 8, shard_rows=16)  # 4 shards
    assert order == [f"shard-{i:05d}.h5" for i in range(4)]
    assert [s["start"] for s in json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"]] == [0, 16, 32, 48]
    assert w.covered == [(0, 64)] and w.complete
    with open_run(tmp_path / "run", verify=True) as r:
        check_values(r[:], np.arange(64))


def test_failed_commit_stops_the_writer_and_lists_nothing_of_it(tmp_path, monkeypatch):
    """A commit that fails in the commit thread (here its fsync) reaches the caller through put() or
    close() as the writer's error; the shard is not listed, no .partial is left, and a resume
    recomputes exactly the samples not listed."""
    real_fsync = store.fsutil.fsync_path

    def fsync(path):
        if ".partial" in str(path) and "00001" in str(path):  # the second shard's file
            raise OSError(errno.EIO, "fsync refused")
        return real_fsync(path)

    monkeypatch.setattr(store.fsutil, "fsync_path", fsync)
    run = tmp_path / "run"
    w = RunWriter(run, config=CONFIG, total=64, shard_rows=16)
    with pytest.raises(StoreError, match="fsync refused"):
        for a in range(0, 64, 8):
            w.put(block(a, a + 8))
            time.sleep(0.05)
        w.close()
    with pytest.raises(StoreError, match="fsync refused"):
        w.close()
    monkeypatch.undo()
    listed = json.loads((run / "manifest.json").read_text())["shards"]
    assert [s["start"] for s in listed] == [0]
    assert not list(run.glob("*.partial")) and not list(run.glob(".*.partial"))
    w = RunWriter(run, config=CONFIG, total=64, shard_rows=16)
    assert w.missing() == [(16, 64)]
    for a in range(16, 64, 8):
        w.put(block(a, a + 8))
    w.close()
    with open_run(run, verify=True) as r:
        check_values(r[:], np.arange(64))
