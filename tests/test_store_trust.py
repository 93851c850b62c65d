"""Issue 13, the store's side: records that cannot be silently wrong, stale or lost.

float16 overflow counted after the cast (4); damaged shards caught on resume, on read and by verify,
with ``verify --repair`` (5); shards that point outside the run rejected (6); user files never
deleted (8); verify fails on non-finite samples with one verdict, and info / the reader tell a
running writer from a stopped one and show a shard in progress (3, 7)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import fastattr
from fastattr.errors import CorruptShardError, StoreError
from fastattr.store import Block, RunWriter, open_run, verify_run

CONFIG = {"method": "integrated_gradients", "n_steps": 8, "fingerprints": {"model": "m0", "data": {"count": 0}}}
SHAPE = (4, 6)


def block(start: int, stop: int, *, scale: float = 1.0, output: np.ndarray | None = None, delta: np.ndarray | None = None) -> Block:
    """Finite, honest data (stats/nonfinite counts the attributions' non-finite values)."""
    i = np.arange(start, stop)
    f = i.astype(np.float32)
    a = (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + f[:, None, None]) * np.float32(scale)
    flat = a.reshape(len(i), -1)
    return Block(
        start=start,
        stop=stop,
        attributions={"x": a},
        target=i % 3,
        output=f * 2 if output is None else output,
        baseline_output=np.zeros(len(i), np.float32),
        delta=np.full(len(i), 1e-4, np.float32) if delta is None else delta,
        n_steps=np.full(len(i), 8, np.int32),
        stats={"sum": flat.sum(1), "l1": np.abs(flat).sum(1), "l2": np.sqrt((flat**2).sum(1)), "absmax": np.abs(flat).max(1), "nonfinite": (~np.isfinite(flat)).sum(1).astype(np.int32)},
    )


def write(run: Path, total: int, *, shard_rows: int = 10, config: dict = CONFIG, **kw) -> None:
    with RunWriter(run, config=config, total=total, shard_rows=shard_rows, **kw) as w:
        for a in range(0, total, 7):
            w.put(block(a, min(a + 7, total)))


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def rehash(run: Path, name: str) -> None:
    """Update the manifest's sha256 of a shard changed on purpose, so only the new checks catch it."""
    man = manifest(run)
    for s in man["shards"]:
        if s["file"] == name:
            s["sha256"] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    (run / "manifest.json").write_text(json.dumps(man))


def flip_in_chunk(path: Path, dataset: str, chunk: int = 0) -> None:
    """Flip one byte in the middle of a data chunk of a dataset (not its metadata)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------------------
# 4. float16 overflow is counted after the cast
# ------------------------------------------------------------------------------------------------


def test_float16_overflow_is_counted_after_the_cast(tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="fastattr.store"), RunWriter(run, config=CONFIG, total=20, shard_rows=8, storage_dtype="float16") as w:
        w.put(block(0, 10))
        w.put(block(10, 20, scale=3000.0))  # sample i: (k + i) * 3000 > 65504 once k + i >= 22
    assert any("float16" in r.getMessage() and "samples [10, " in r.getMessage() for r in caplog.records)
    with open_run(run) as r:
        stored = r[:]["attributions"]["x"].astype(np.float32).reshape(20, -1)
        counts = r.field("stats/nonfinite")
    np.testing.assert_array_equal(counts, (~np.isfinite(stored)).sum(1))  # what is stored, not what was computed
    assert counts[:10].sum() == 0 and (counts[10:] > 0).all()
    rep = verify_run(run)
    assert rep.verdict == "FAILED" and rep.exit_code == 1
    assert any("non-finite" in p and "[10, 20)" in p for p in rep.problems), rep.problems


def test_caller_counts_are_kept_and_never_undercount(tmp_path):
    """stats/nonfinite keeps what the caller counted (it may count non-finite outputs too) and is at
    least the number of non-finite values actually stored."""
    run = tmp_path / "run"
    b = block(0, 4)
    b.attributions["x"][1, 0, 0] = np.inf  # counted by nobody
    b.stats["nonfinite"] = np.array([0, 0, 3, 0], np.int32)  # the caller's own count for sample 2
    with RunWriter(run, config=CONFIG, total=4) as w:
        w.put(b)
    with open_run(run) as r:
        assert r.field("stats/nonfinite").tolist() == [0, 1, 3, 0]


def test_float16_end_to_end_through_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.fill_(500.0)
    x = torch.full((6, 8), 300.0)  # IG attribution ~ 500 * 300 = 1.5e5 per feature: above float16's 65504
    fastattr.run(model, x.numpy(), str(tmp_path / "run"), n_steps=4, target=0, storage_dtype="float16", progress=False)
    with open_run(tmp_path / "run") as r:
        assert (r.field("stats/nonfinite") == 8).all()
    assert verify_run(tmp_path / "run").exit_code == 1


# ------------------------------------------------------------------------------------------------
# 5. damaged shards: resume, read, verify, repair
# ------------------------------------------------------------------------------------------------


def test_resume_recomputes_a_truncated_shard(tmp_path, caplog):
    run = tmp_path / "run"
    write(run, 30)
    path = run / "shard-00001.h5"
    path.write_bytes(path.read_bytes()[:-500])
    with caplog.at_level(logging.WARNING, logger="fastattr.store"):
        w = RunWriter(run, config=CONFIG, total=30, shard_rows=10)
    assert w.missing() == [(10, 20)] and not w.complete
    assert any("shard-00001.h5" in r.getMessage() and "[10, 20)" in r.getMessage() for r in caplog.records)
    assert (run / "shard-00001.h5.corrupt").exists() and not path.exists()  # kept for inspection, never deleted
    assert "shard-00001.h5" not in [s["file"] for s in manifest(run)["shards"]]  # dropped before any new shard
    w.put(block(10, 20))
    w.close()
    assert w.complete
    rep = verify_run(run)
    assert rep.verdict == "OK", rep.problems
    assert any(".corrupt" in x for x in rep.warnings)
    with open_run(run) as r:
        np.testing.assert_array_equal(r[:]["attributions"]["x"], block(0, 30).attributions["x"])


def test_resume_checks_the_checksum_of_every_listed_shard(tmp_path):
    """A flipped byte that leaves the HDF5 structure readable is still caught on resume (sha256)."""
    run = tmp_path / "run"
    write(run, 30, compression="none")
    flip_in_chunk(run / "shard-00002.h5", "attributions/x")
    w = RunWriter(run, config=CONFIG, total=30, shard_rows=10)
    assert w.missing() == [(20, 30)]
    w.abort()


def test_reader_detects_a_flipped_chunk(tmp_path):
    """Without the per-chunk checksum a flipped byte reads back as a wrong number."""
    run = tmp_path / "run"
    write(run, 20, compression="none")
    flip_in_chunk(run / "shard-00001.h5", "attributions/x")
    with open_run(run) as r:  # metadata is intact: opening works, reading the chunk does not
        np.testing.assert_array_equal(r[0:10]["attributions"]["x"], block(0, 10).attributions["x"])
        with pytest.raises(CorruptShardError, match=r"shard-00001\.h5.*verify --repair"):
            r[10:20]
        with pytest.raises(CorruptShardError, match=r"shard-00001\.h5"):
            list(r.iter_batches(4))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.h5: checksum mismatch"):
        open_run(run, verify=True)
    # plain h5py, without fastattr, refuses the damaged chunk too
    with h5py.File(run / "shard-00001.h5", "r") as f, pytest.raises(OSError):
        f["attributions/x"][()]


def test_reader_detects_a_flipped_chunk_even_with_the_checksum_updated(tmp_path):
    run = tmp_path / "run"
    write(run, 20, compression="lzf")
    flip_in_chunk(run / "shard-00000.h5", "delta")
    rehash(run, "shard-00000.h5")
    with open_run(run) as r, pytest.raises(CorruptShardError, match="shard-00000.h5"):
        r.field("delta")


def test_verify_repair_then_resume(tmp_path):
    run = tmp_path / "run"
    write(run, 30)
    flip_in_chunk(run / "shard-00000.h5", "attributions/x")
    rep = verify_run(run)
    assert rep.verdict == "FAILED" and any("shard-00000.h5" in p for p in rep.problems)
    fixed = verify_run(run, repair=True)
    assert fixed.verdict == "INCOMPLETE" and fixed.exit_code == 1 and fixed.ok
    assert any("shard-00000.h5" in x and "[0, 10)" in x for x in fixed.repaired)
    assert fixed.lines()[0].startswith("INCOMPLETE: 20 of 30 samples")
    assert (run / "shard-00000.h5.corrupt").exists()
    w = RunWriter(run, config=CONFIG, total=30, shard_rows=10)
    assert w.missing() == [(0, 10)]
    w.put(block(0, 10))
    w.close()
    assert verify_run(run).verdict == "OK"


def test_verify_repair_refuses_while_a_writer_runs(tmp_path):
    run = tmp_path / "run"
    w = RunWriter(run, config=CONFIG, total=30, shard_rows=10)
    try:
        rep = verify_run(run, repair=True)
        assert rep.verdict == "FAILED" and "in use" in rep.problems[0]
    finally:
        w.abort()


def test_run_again_recomputes_a_damaged_shard(tmp_path):
    """The same fastattr.run call after a shard was damaged: not "computed 0, complete"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = np.random.default_rng(0).standard_normal((24, 5)).astype(np.float32)
    out = str(tmp_path / "run")
    first = fastattr.run(model, x, out, n_steps=4, shard_size=8, progress=False)
    before = open_run(out)[:]["attributions"]["x"]
    flip_in_chunk(Path(out) / "shard-00001.h5", "attributions/x")
    again = fastattr.run(model, x, out, n_steps=4, shard_size=8, progress=False)
    assert first.computed == 24 and again.computed == 8 and again.complete
    np.testing.assert_array_equal(open_run(out, verify=True)[:]["attributions"]["x"], before)


def test_fletcher32_on_every_dataset_and_plain_h5py_reads_schema_2(tmp_path):
    run = tmp_path / "run"
    write(run, 12, compression="gzip")
    with h5py.File(run / "shard-00000.h5", "r") as f:
        datasets = []
        f.visititems(lambda n, o: datasets.append(o) if isinstance(o, h5py.Dataset) else None)
        assert datasets and all(ds.fletcher32 for ds in datasets)
        assert f.attrs["schema_version"] == 2 and f.userblock_size == 512
    assert manifest(run)["schema_version"] == 2


def test_schema_1_runs_stay_readable_and_resumable(tmp_path):
    """A run as schema 1 wrote it (no checksums per chunk, no marker, default HDF5 format)."""
    run = tmp_path / "run"
    with RunWriter(run, config=CONFIG, total=30, shard_rows=10) as w:
        w.put(block(0, 20))
    for name in ("shard-00000.h5", "shard-00001.h5"):
        path = run / name
        with h5py.File(path, "r") as src, h5py.File(tmp_path / "old.h5", "w") as dst:
            for key, value in src.attrs.items():
                if key != "run_id":
                    dst.attrs[key] = value

            def copy(name, obj):
                if isinstance(obj, h5py.Dataset):
                    dst.create_dataset(name, data=obj[()], chunks=obj.chunks, maxshape=obj.maxshape, compression="lzf")

            src.visititems(copy)
            dst.attrs["schema_version"] = 1
        os.replace(tmp_path / "old.h5", path)
        rehash(run, name)
    man = manifest(run)
    man["schema_version"] = 1
    (run / "manifest.json").write_text(json.dumps(man))
    assert verify_run(run).verdict == "INCOMPLETE"
    with open_run(run) as r:
        np.testing.assert_array_equal(r[:]["attributions"]["x"], block(0, 20).attributions["x"])
    w = RunWriter(run, config=CONFIG, total=30, shard_rows=10)  # resume keeps them: old, not damaged
    assert w.missing() == [(20, 30)]
    w.put(block(20, 30))
    w.close()
    assert manifest(run)["schema_version"] == 2 and verify_run(run).verdict == "OK"
    with open_run(run, verify=True) as r:
        np.testing.assert_array_equal(r[:]["attributions"]["x"], block(0, 30).attributions["x"])
    with h5py.File(run / "shard-00000.h5") as old, h5py.File(run / "shard-00002.h5") as new:
        assert old.attrs["schema_version"] == 1 and new.attrs["schema_version"] == 2


# ------------------------------------------------------------------------------------------------
# 6. shards that point outside the run
# ------------------------------------------------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside.h5"
    with h5py.File(path, "w") as f:
        f["d"] = np.full(10, 7.0, np.float32)
    (tmp_path / "outside.bin").write_bytes(np.full(10, 7.0, np.float32).tobytes())
    return path


def _external_link(f: h5py.File, outside: Path) -> str:
    del f["output"]
    f["output"] = h5py.ExternalLink(str(outside), "/d")
    return "ExternalLink"


def _soft_link(f: h5py.File, outside: Path) -> str:
    f["extras_link"] = h5py.ExternalLink(str(outside), "/d")
    del f["output"]
    f["output"] = h5py.SoftLink("/extras_link")
    return "SoftLink"


def _external_storage(f: h5py.File, outside: Path) -> str:
    del f["output"]
    f.create_dataset("output", shape=(10,), dtype=np.float32, external=[(str(outside.with_suffix(".bin")), 0, 40)])
    return "external files"


def _virtual(f: h5py.File, outside: Path) -> str:
    del f["output"]
    layout = h5py.VirtualLayout(shape=(10,), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(outside), "d", shape=(10,))
    f.create_virtual_dataset("output", layout)
    return "virtual dataset"


@pytest.mark.parametrize("plant", [_external_link, _soft_link, _external_storage, _virtual])
def test_shards_pointing_outside_the_run_are_rejected(tmp_path, plant):
    run = tmp_path / "run"
    write(run, 20)
    outside = _outside(tmp_path)
    with h5py.File(run / "shard-00000.h5", "r+") as f:
        what = plant(f, outside)
    rehash(run, "shard-00000.h5")  # the manifest's checksum matches: only the new check catches it
    with pytest.raises(CorruptShardError, match=rf"shard-00000\.h5: .*/output.*{what}|shard-00000\.h5: .*{what}.*/output"):
        open_run(run)
    rep = verify_run(run)
    assert rep.verdict == "FAILED" and any("shard-00000.h5" in p and what in p for p in rep.problems), rep.problems
    w = RunWriter(run, config=CONFIG, total=20, shard_rows=10)  # resume drops it
    assert w.missing() == [(0, 10)]
    w.abort()


# ------------------------------------------------------------------------------------------------
# 8. a run never deletes user files
# ------------------------------------------------------------------------------------------------

USER_FILES = {
    "shard-00005.h5": None,  # an HDF5 file of the user's (written below)
    "shard-00001.h5.partial": b"user data 1",
    "notes.partial": b"user data 2",
    "manifest.rank-00001.json": b'{"mine": true}',
    "manifest.json.partial": b"user data 3",
}


def _user_files(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in USER_FILES.items():
        if data is None:
            with h5py.File(d / name, "w") as f:
                f["mine"] = np.arange(3)
        else:
            (d / name).write_bytes(data)
    return {name: (d / name).read_bytes() for name in USER_FILES}


def _unchanged(d: Path, before: dict[str, bytes]) -> None:
    for name, data in before.items():
        assert (d / name).read_bytes() == data, name


def test_a_directory_of_user_files_is_refused_and_untouched(tmp_path):
    d = tmp_path / "mine"
    before = _user_files(d)
    for kw in ({}, {"overwrite": True}, {"resume": False}):
        with pytest.raises(StoreError, match="holds no fastattr run"):
            RunWriter(d, config=CONFIG, total=10, **kw)
        _unchanged(d, before)
    assert sorted(p.name for p in d.iterdir()) == sorted(USER_FILES)  # not even a lock file


def test_allow_other_files_writes_beside_them(tmp_path):
    d = tmp_path / "mine"
    before = _user_files(d)
    write(d, 20, allow_other_files=True)
    _unchanged(d, before)
    assert [s["file"] for s in manifest(d)["shards"]] == ["shard-00006.h5", "shard-00007.h5"]  # names above the user's
    write(d, 20, overwrite=True)  # overwrite deletes its own shards only
    _unchanged(d, before)
    RunWriter(d, config=CONFIG, total=20).close()  # resume: the user's files are neither orphans nor partials
    _unchanged(d, before)
    assert verify_run(d).verdict == "OK"


def test_overwrite_deletes_only_listed_files_that_are_fastattr_shards(tmp_path):
    run = tmp_path / "run"
    write(run, 20)
    (run / "data.npy").write_bytes(b"precious")
    man = manifest(run)
    man["shards"].append({"file": "data.npy", "start": 15, "stop": 16, "rows": 1, "sha256": "0" * 64})  # a manifest naming a user file
    (run / "manifest.json").write_text(json.dumps(man))
    RunWriter(run, config=CONFIG, total=20, overwrite=True).close()
    assert (run / "data.npy").read_bytes() == b"precious"
    assert not (run / "shard-00000.h5").exists() and not (run / "shard-00001.h5").exists()


def test_a_foreign_manifest_is_never_replaced(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "manifest.json").write_text('{"dataset": "mine", "files": ["a.bin"]}')
    (d / "a.bin").write_bytes(b"x")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(StoreError, match="not a fastattr manifest"):
            RunWriter(d, config=CONFIG, total=10, **kw)
    assert (d / "manifest.json").read_text() == '{"dataset": "mine", "files": ["a.bin"]}' and (d / "a.bin").exists()


def test_a_damaged_fastattr_manifest_can_still_be_overwritten(tmp_path):
    run = tmp_path / "run"
    write(run, 20)
    text = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(text[: len(text) // 3])
    with pytest.raises(StoreError, match="manifest.json"):
        RunWriter(run, config=CONFIG, total=20)
    RunWriter(run, config=CONFIG, total=20, overwrite=True).close()
    assert not (run / "shard-00000.h5").exists()  # the old run's shards (they carry fastattr's marker)


def test_resume_keeps_user_files_in_a_run_directory(tmp_path):
    run = tmp_path / "run"
    write(run, 20, shard_rows=20)
    before = _user_files(run)
    (run / ".fastattr-shard-00009.h5.partial").write_bytes(b"an unfinished shard of fastattr's")
    w = RunWriter(run, config=CONFIG, total=20)
    w.close()
    _unchanged(run, before)
    assert not (run / ".fastattr-shard-00009.h5.partial").exists()
    warnings = verify_run(run).warnings
    assert any("shard-00001.h5.partial" in x for x in warnings) and any("shard-00005.h5" in x for x in warnings)


# ------------------------------------------------------------------------------------------------
# 3, 7. verify fails on non-finite samples, one verdict; info tells running from stopped
# ------------------------------------------------------------------------------------------------


def _nonfinite_run(run: Path, config: dict) -> None:
    out = np.arange(10, dtype=np.float32)
    out[3] = np.nan  # F(x) NaN: stats/nonfinite 0, as a model returning NaN gave before issue 13
    delta = np.full(10, 1e-4, np.float32)
    delta[7] = np.nan  # a NaN residual although F(x0) is defined
    b = block(0, 10, output=out, delta=delta)
    b.stats["nonfinite"][5] = 2  # counted by the caller
    with RunWriter(run, config=config, total=10) as w:
        w.put(b)


def test_verify_fails_on_non_finite_samples(tmp_path):
    _nonfinite_run(tmp_path / "run", CONFIG)
    rep = verify_run(tmp_path / "run")
    assert rep.verdict == "FAILED" and rep.exit_code == 1
    assert rep.nonfinite_samples == [(3, 4), (5, 6), (7, 8)]
    assert any("[3, 4), [5, 6), [7, 8)" in p for p in rep.problems)


def test_verify_lists_allowed_non_finite_samples_as_facts(tmp_path):
    _nonfinite_run(tmp_path / "run", {**CONFIG, "allow_nonfinite": True})
    rep = verify_run(tmp_path / "run")
    assert rep.verdict == "OK" and rep.exit_code == 0
    assert rep.nonfinite_samples == [(3, 4), (5, 6), (7, 8)] and any("[3, 4), [5, 6), [7, 8)" in n for n in rep.notes)


def test_no_residual_is_not_a_non_finite_residual(tmp_path):
    """Methods without a baseline store NaN for F(x0) and delta: that is not a failure."""
    b = block(0, 5, delta=np.full(5, np.nan, np.float32))
    b.baseline_output = np.full(5, np.nan, np.float32)
    with RunWriter(tmp_path / "run", config=CONFIG, total=5) as w:
        w.put(b)
    assert verify_run(tmp_path / "run").verdict == "OK"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastattr", *args], capture_output=True, text=True, timeout=120)


def test_verify_cli_one_verdict_for_an_incomplete_run(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run, config=CONFIG, total=30, shard_rows=10) as w:
        w.put(block(0, 10))
    res = _cli("verify", str(run))
    lines = res.stdout.splitlines()
    assert res.returncode == 1 and lines[0].startswith("INCOMPLETE: 10 of 30 samples"), res.stdout
    assert not any(line.startswith("OK") for line in lines)


def test_verify_cli_repair(tmp_path):
    run = tmp_path / "run"
    write(run, 20)
    flip_in_chunk(run / "shard-00001.h5", "attributions/x")
    res = _cli("verify", "--repair", str(run))
    assert res.returncode == 1 and res.stdout.startswith("INCOMPLETE"), res.stdout
    assert "repaired: shard-00001.h5: samples [10, 20) dropped" in res.stdout and "rerun the same command" in res.stdout


WRITER = r"""
import sys, time
import numpy as np
from fastattr.store import Block, RunWriter
run, rows = sys.argv[1], int(sys.argv[2])
w = RunWriter(run, config={"method": "m"}, total=1500, shard_rows=1000)
i = np.arange(rows)
f = i.astype(np.float32)
w.put(Block(start=0, stop=rows, attributions={"x": np.ones((rows, 3), np.float32)}, target=i, output=f, baseline_output=f, delta=f * 0,
            n_steps=np.ones(rows, np.int32), stats={k: f for k in ("sum", "l1", "l2", "absmax")} | {"nonfinite": np.zeros(rows, np.int32)}))
print("put", flush=True)
time.sleep(600)
"""


def test_info_tells_a_running_writer_from_a_killed_one(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run), "400"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "put"
        deadline = time.monotonic() + 60
        while True:  # the writer thread appends the block to the open shard
            with open_run(run) as r:
                progress = r.in_progress()
                if progress and progress[0].rows == 400:
                    assert r.status == "running" and len(r) == 0
                    break
            assert time.monotonic() < deadline, progress
            time.sleep(0.1)
        info = _cli("info", str(run))
        assert "status: running, 0 of 1500 samples" in info.stdout, info.stdout
        assert "in progress: 400 rows from sample 0 in .fastattr-shard-00000.h5.partial (being written)" in info.stdout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    with open_run(run) as r:
        assert r.status == "stopped" and r.metadata["status"] == "stopped"
    info = _cli("info", str(run))
    assert "status: stopped, 0 of 1500 samples" in info.stdout and "left unfinished by a stopped writer" in info.stdout
    assert "rerun the same command to resume" in info.stdout
    rep = verify_run(run)
    assert rep.verdict == "INCOMPLETE" and rep.status == "stopped" and any("400 rows" in n for n in rep.notes)


def test_a_foreign_fragment_name_blocks_only_distributed_runs(tmp_path):
    run = tmp_path / "run"
    write(run, 10)
    (run / "manifest.rank-00001.json").write_text('{"mine": true}')
    with pytest.raises(StoreError, match=r"manifest\.rank-00001\.json is not a fastattr fragment"):
        RunWriter(run, config=CONFIG, total=10, rank=0, world_size=2)  # rank 1 would write that name
    RunWriter(run, config=CONFIG, total=10).close()  # one process writes no fragment: it is left alone
    assert (run / "manifest.rank-00001.json").read_text() == '{"mine": true}'


def test_a_status_probe_never_makes_a_writer_fail(tmp_path):
    """Readers probe the writer lock with a shared flock for an instant; a writer retries its lock
    for 0.5 s instead of refusing at once."""
    import fcntl
    import threading

    run = tmp_path / "run"
    write(run, 10)
    fd = os.open(run / ".fastattr-writer.lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a probe, held far longer than a real one
    timer = threading.Timer(0.2, os.close, args=(fd,))
    timer.start()
    try:
        RunWriter(run, config=CONFIG, total=10).close()
    finally:
        timer.join()
