"""Parallel chunk encoding (store/encode.py): shards written with compression="gzip" hold chunks
encoded in the thread pool and written with write_direct_chunk; plain h5py must read them bit for
bit, check their fletcher32, and a SIGKILL while encoding must lose nothing finalized."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fastattr.store import Block, RunWriter, encode, verify_run
from fastattr.store.encode import encode_chunk, fletcher32


def rows(start: int, stop: int, width: int, incompressible_from: int | None = None) -> np.ndarray:
    """Deterministic float32 rows; from ``incompressible_from`` on, random bits (deflate cannot shrink them)."""
    np.seterr(all="ignore")
    i = np.arange(start, stop, dtype=np.float32)[:, None]
    a = np.sin(i * 0.37 + np.arange(width, dtype=np.float32)[None, :] * 0.011).astype(np.float32) * 3.0
    if incompressible_from is not None:
        for r in range(start, stop):
            if r >= incompressible_from:
                bits = np.random.default_rng(r).integers(0, 2**32, width, dtype=np.uint32)
                a[r - start] = bits.view(np.float32)  # some NaN/inf: the store counts them, stores the bits
    return a


def block(start: int, stop: int, width: int, **kw) -> Block:
    n = stop - start
    z = np.zeros(n, np.float32)
    stats = {"sum": z, "l1": z, "l2": z, "absmax": z, "nonfinite": np.zeros(n, np.int32)}
    return Block(
        start,
        stop,
        {"x": rows(start, stop, width, **kw)},
        np.arange(n, dtype=np.int64),
        z + 1,
        z,
        z,
        np.ones(n, np.int32),
        stats,
    )


def read_plain(run: Path, compression: str = "gzip") -> tuple[np.ndarray, np.ndarray]:
    """(index, attributions/x) of every listed shard, read with plain h5py only."""
    entries = json.loads((run / "manifest.json").read_text())["shards"]
    idx, xs = [], []
    for e in entries:
        with h5py.File(run / e["file"], "r") as f:
            ds = f["attributions/x"]
            if compression == "gzip":
                assert ds.shuffle and ds.compression == "gzip" and ds.fletcher32  # the declared pipeline
            else:
                assert not ds.shuffle and ds.compression is None and ds.fletcher32  # fletcher32 alone
            idx.append(f["index"][()])
            xs.append(ds[()])
    order = np.argsort(np.concatenate(idx))
    return np.concatenate(idx)[order], np.concatenate(xs)[order]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parallel_none_round_trips_bit_exactly(tmp_path, dtype, monkeypatch):
    """compression="none": raw chunks with their fletcher32 made in the pool (the writer thread only
    writes them): plain h5py reads every value back and checks every chunk's checksum."""
    width, total = 20000, 41
    monkeypatch.setenv("FASTATTR_ENCODE_THREADS", "4")  # pooled checksums need >= 4 encode threads (schema.py)
    encoded = []
    real = encode.encode_chunk
    monkeypatch.setattr(encode, "encode_chunk", lambda a, level: encoded.append(level) or real(a, level))
    with RunWriter(tmp_path / "run", config={"m": 1, "allow_nonfinite": True}, total=total, shard_rows=16, storage_dtype=dtype, compression="none") as w:
        for s in range(0, total, 5):
            w.put(block(s, min(s + 5, total), width, incompressible_from=30))
    idx, got = read_plain(tmp_path / "run", "none")
    want = rows(0, total, width, incompressible_from=30)
    if dtype == "float16":
        with np.errstate(over="ignore", invalid="ignore"):
            want = want.astype(np.float16)
    assert np.array_equal(idx, np.arange(total)) and got.dtype == np.dtype(dtype) and got.tobytes() == want.tobytes()
    assert encoded and set(encoded) == {None}  # every attribution chunk went through the pool, not HDF5's filter
    with h5py.File(tmp_path / "run" / "shard-00002.h5", "r") as f:
        ds = f["attributions/x"]
        raw = ds.chunks[0] * width * ds.dtype.itemsize
        assert all(ds.id.get_chunk_info(i).size == raw + 4 for i in range(ds.id.get_num_chunks()))  # bytes + checksum
        for i in range(ds.id.get_num_chunks()):  # the checksum is the one HDF5 checks on read
            mask, stored = ds.id.read_direct_chunk(ds.id.get_chunk_info(i).chunk_offset)
            assert mask == 0 and fletcher32(stored[:-4]) == struct.unpack("<I", stored[-4:])[0]
    assert verify_run(tmp_path / "run").ok


def test_none_keeps_hdf5s_checksum_on_a_small_pool(tmp_path, monkeypatch):
    """With fewer encode threads than POOL_CHECKSUM_MIN_THREADS, HDF5's own fletcher32 filter (C, in
    the writer thread) costs less CPU in all: the pool makes no chunks, and the shards read the same."""
    monkeypatch.setenv("FASTATTR_ENCODE_THREADS", "2")
    encoded = []
    real = encode.encode_chunk
    monkeypatch.setattr(encode, "encode_chunk", lambda a, level: encoded.append(level) or real(a, level))
    with RunWriter(tmp_path / "run", config={"m": 1, "allow_nonfinite": True}, total=20, shard_rows=16, compression="none") as w:
        for s in range(0, 20, 5):
            w.put(block(s, s + 5, 3000))
    idx, got = read_plain(tmp_path / "run", "none")
    assert not encoded and np.array_equal(idx, np.arange(20)) and got.tobytes() == rows(0, 20, 3000).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parallel_gzip_round_trips_bit_exactly(tmp_path, dtype):
    # 20000 values per row: 3 rows per chunk in float32, 6 in float16 (odd sizes); blocks of 5 rows
    # and shards of 16 rows end mid-chunk, so trailing partial chunks wait across blocks and shards;
    # rows from 30 on are random bits (a chunk deflate cannot shrink).
    width, total = 20000, 41
    with RunWriter(
        tmp_path / "run",
        config={"m": 1, "allow_nonfinite": True},
        total=total,
        shard_rows=16,
        storage_dtype=dtype,
        compression="gzip",
    ) as w:
        for s in range(0, total, 5):
            w.put(block(s, min(s + 5, total), width, incompressible_from=30))
    idx, got = read_plain(tmp_path / "run")
    want = rows(0, total, width, incompressible_from=30)
    if dtype == "float16":
        with np.errstate(over="ignore", invalid="ignore"):
            want = want.astype(np.float16)
    assert np.array_equal(idx, np.arange(total))
    assert got.dtype == np.dtype(dtype) and got.tobytes() == want.tobytes()
    with h5py.File(tmp_path / "run" / "shard-00002.h5", "r") as f:  # rows 32..40: random bits
        ds = f["attributions/x"]
        assert ds.chunks[0] == (3 if dtype == "float32" else 6)
        sizes = [ds.id.get_chunk_info(i).size for i in range(ds.id.get_num_chunks())]
        raw = ds.chunks[0] * width * ds.dtype.itemsize
        if dtype == "float32":  # random float32 bits cast to float16 are mostly inf or 0: compressible
            assert max(sizes) > raw  # a chunk that did not compress is stored (deflate's expansion + checksum)
    assert verify_run(tmp_path / "run").ok


def test_checksum_is_hdf5s_own(tmp_path):
    # the same chunk written by HDF5 itself carries exactly the fletcher32 computed here
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for n, a in enumerate(
            [
                rng.standard_normal(9999).astype(np.float32),
                np.zeros(361, np.float32),
                np.full(5000, -np.nan, np.float32),
            ]
        ):
            ds = f.create_dataset(f"d{n}", data=a, chunks=a.shape, shuffle=True, compression="gzip", fletcher32=True)
            _, stored = ds.id.read_direct_chunk((0,))
            assert fletcher32(stored[:-4]) == struct.unpack("<I", stored[-4:])[0]
            mine = f.create_dataset(
                f"e{n}", shape=a.shape, dtype=a.dtype, chunks=a.shape, shuffle=True, compression="gzip", fletcher32=True
            )
            mine.id.write_direct_chunk((0,), encode_chunk(a, 1), 0)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for n in range(3):
            assert f[f"e{n}"][()].tobytes() == f[f"d{n}"][()].tobytes()
    # odd lengths, block edges and all-0xff data (whose sums wrap in 32 bits) against the C loop
    for n in (0, 1, 2, 3, 719, 720, 721, 1001, 65537):
        for data in (rng.integers(0, 256, n, dtype=np.uint8).tobytes(), b"\xff" * n, bytes(n)):
            assert fletcher32(data) == c_loop_fletcher32(data), n


def test_vectorised_fletcher32_matches_the_c_loop_on_adversarial_data(monkeypatch):
    """The folds between 360-word blocks are solved vectorised (encode._folded_sums); data whose
    sums sit at the fold boundaries (all 0xff, mostly 0xff, alternating extremes) needs the most
    passes; the sequential fallback (no passes at all) must agree too."""
    rng = np.random.default_rng(7)
    cases = [b"\xff" * 1441, b"\xff" * 720 * 50 + b"\x00" * 3, bytes(720 * 9 + 1)]
    for n in (1, 2, 719, 720, 721, 4321, 65536, 262147):
        cases += [
            rng.integers(0, 256, n, dtype=np.uint8).tobytes(),
            np.where(rng.random(n) < 0.995, 255, 0).astype(np.uint8).tobytes(),
            np.where(rng.random(n) < 0.5, 255, 0).astype(np.uint8).tobytes(),
            rng.integers(250, 256, n, dtype=np.uint8).tobytes(),
            rng.standard_normal(n // 4 + 1).astype(np.float32).tobytes()[:n],
        ]
    for data in cases:
        assert fletcher32(data) == c_loop_fletcher32(data), len(data)
    monkeypatch.setattr(encode, "_FOLD_ROUNDS", 0)  # straight to the sequential finish
    for data in cases[:12]:
        assert fletcher32(data) == c_loop_fletcher32(data), len(data)


def c_loop_fletcher32(data: bytes) -> int:
    """H5_checksum_fletcher32 transcribed line by line (uint32 arithmetic masked)."""
    m = 0xFFFFFFFF
    words, s1, s2, p = len(data) // 2, 0, 0, 0
    while words:
        t = min(words, 360)
        words -= t
        for _ in range(t):
            s1 = (s1 + ((data[p] << 8) | data[p + 1])) & m
            s2 = (s2 + s1) & m
            p += 2
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 = (s1 + (data[p] << 8)) & m
        s2 = (s2 + s1) & m
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    return ((s2 << 16) | s1) & m


def test_corrupted_byte_is_detected_by_plain_h5py(tmp_path):
    width = 20000
    with RunWriter(
        tmp_path / "run", config={"m": 1, "allow_nonfinite": True}, total=12, shard_rows=12, compression="gzip"
    ) as w:
        w.put(block(0, 12, width))
    shard = tmp_path / "run" / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        info = f["attributions/x"].id.get_chunk_info(1)
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([b[0] ^ 0x10]))
    with h5py.File(shard, "r") as f:
        f["attributions/x"][:3]  # chunk 0 is intact
        with pytest.raises(OSError):
            f["attributions/x"][3:6]


KILL_CHILD = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from test_store_encode import block
from fastattr.store import RunWriter
with RunWriter(sys.argv[1], config={"m": 1, "allow_nonfinite": True}, total=100000, shard_rows=12, compression="gzip", queue_size=2) as w:
    for s in range(0, 100000, 5):
        w.put(block(s, s + 5, 60000, incompressible_from=0))
"""


def test_sigkill_during_parallel_encoding_loses_nothing_finalized(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "FASTATTR_ENCODE_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(run), str(Path(__file__).parent)], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            m = run / "manifest.json"
            if m.exists() and len(json.loads(m.read_text()).get("shards", [])) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no shard was finalized in time")
        proc.send_signal(signal.SIGKILL)  # mid-way: the pool is encoding the next shard's chunks
    finally:
        proc.kill()
        proc.wait()
    listed = json.loads((run / "manifest.json").read_text())["shards"]
    assert len(listed) >= 2
    idx, got = read_plain(run)
    assert got.tobytes() == rows(int(idx[0]), int(idx[-1]) + 1, 60000, incompressible_from=0).tobytes()
    assert np.array_equal(idx, np.arange(len(idx)))
    report = verify_run(run)
    assert report.ok and report.problems == [] and report.samples == len(idx)
    # resuming (a new writer) trusts exactly the listed shards
    with RunWriter(run, config={"m": 1, "allow_nonfinite": True}, total=100000, shard_rows=12, compression="gzip") as w:
        assert w.covered == [(0, len(idx))]
        w.abort()


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_blocks_smaller_and_larger_than_a_chunk(tmp_path, step):
    # 3 rows per chunk: blocks of 1 and 2 rows fill a chunk over several blocks, 7 spans chunks
    width, total = 20000, 20
    with RunWriter(
        tmp_path / "run", config={"m": 1, "allow_nonfinite": True}, total=total, shard_rows=11, compression="gzip"
    ) as w:
        for s in range(0, total, step):
            w.put(block(s, min(s + step, total), width))
    idx, got = read_plain(tmp_path / "run")
    assert np.array_equal(idx, np.arange(total)) and got.tobytes() == rows(0, total, width).tobytes()


def test_failed_direct_chunk_writes_are_clean_errors_and_resume(tmp_path):
    # test_crash.py's file-size-limit sweep with the parallel encoder: a write_direct_chunk (or the
    # final partial chunk's) failing for lack of room drops the shard safely (no crash in close)
    from test_crash import SWEEP_CHILD

    child = SWEEP_CHILD.replace("shard_rows=rows)", 'shard_rows=rows, compression="gzip")')
    assert child.count('compression="gzip"') == 2
    limits = [3_000, 20_000, 100_000, 200_000, 300_000]
    r = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path), *map(str, limits)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [res["limit"] for res in results] == limits
    for res in results:
        assert res["outcome"].startswith(f"file too large: the file-size limit ({res['limit']} bytes"), res
        assert res["ok"] and res["kept_ok"] and res["resumed"], res
    assert any(res["kept"] > 0 for res in results) and any(res["kept"] == 0 for res in results)


# -- compression="auto" (the default): per shard, gzip where it shrinks the attributions 1.5x, else none


def filters(run: Path) -> list[str | None]:
    """Each listed shard's attribution filter, as plain h5py sees it."""
    out = []
    for e in json.loads((run / "manifest.json").read_text())["shards"]:
        with h5py.File(run / e["file"], "r") as f:
            ds = f["attributions/x"]
            assert ds.fletcher32
            out.append(ds.compression)
    return out


def test_auto_compresses_the_shards_that_shrink_and_reads_back_any_mix(tmp_path):
    # shard 0: smooth rows (deflate shrinks them many times) -> gzip; shard 1: random bits -> stored raw
    width = 20000
    with RunWriter(tmp_path / "run", config={"m": 1, "allow_nonfinite": True}, total=16, shard_rows=8) as w:  # default: auto
        assert w.compression == "auto"
        w.put(block(0, 8, width, incompressible_from=8))
        w.put(block(8, 16, width, incompressible_from=8))
    assert filters(tmp_path / "run") == ["gzip", None]
    idx, got = [], []
    for e in json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"]:
        with h5py.File(tmp_path / "run" / e["file"], "r") as f:
            idx.append(f["index"][()])
            got.append(f["attributions/x"][()])
    assert np.array_equal(np.concatenate(idx), np.arange(16))
    assert np.concatenate(got).tobytes() == rows(0, 16, width, incompressible_from=8).tobytes()
    assert verify_run(tmp_path / "run").ok
    import fastattr

    with fastattr.open(tmp_path / "run") as r:
        assert r[:]["attributions"]["x"].tobytes() == rows(0, 16, width, incompressible_from=8).tobytes()


def test_auto_choice_follows_the_measured_ratio():
    from fastattr.store.encode import deflate_ratio
    from fastattr.store.schema import AUTO_MIN_RATIO, AUTO_PROBE_BYTES

    smooth = rows(0, 8, 20000)
    noise = np.random.default_rng(0).standard_normal((8, 20000)).astype(np.float32)  # a float's low bytes: noise
    assert deflate_ratio(smooth, 1, AUTO_PROBE_BYTES) >= AUTO_MIN_RATIO
    assert 1.0 < deflate_ratio(noise, 1, AUTO_PROBE_BYTES) < AUTO_MIN_RATIO  # shrinks a little (exponent bytes), not enough
    assert deflate_ratio(noise, 1, AUTO_PROBE_BYTES) == deflate_ratio(noise.copy(), 1, AUTO_PROBE_BYTES)  # deterministic
    # small rows whose end is padding (token attributions past each sequence's length): whole rows
    padded = np.random.default_rng(1).standard_normal((64, 4096)).astype(np.float32)
    padded[:, 2048:] = 0  # stored: about 2.3x smaller
    assert deflate_ratio(padded, 1, AUTO_PROBE_BYTES) >= AUTO_MIN_RATIO
    # wide rows: pieces spread over each row, not its prefix (here the noise half)
    wide = np.zeros((4, 100000), np.float32)
    wide[:, :50000] = np.random.default_rng(2).standard_normal((4, 50000))
    wide[:, 50000:] = np.sin(np.arange(50000, dtype=np.float32) * 0.01)  # smooth: compresses well
    assert deflate_ratio(wide, 1, AUTO_PROBE_BYTES) > deflate_ratio(wide[:, :50000], 1, AUTO_PROBE_BYTES) + 0.05  # a prefix: equal


class Flaky(torch.nn.Module):
    """A small CNN that raises on the batch holding sample 13 (marked by a pixel of 1000) while
    ``broken`` is set: a run that stops midway."""

    broken = True

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if Flaky.broken and bool((x[:, 0, 0, 0] == 1000).any()):
            raise OSError("disk went away")
        return self.net(x)


@pytest.mark.parametrize("first,second", [("lzf", "auto"), ("gzip", "none"), ("none", "lzf")])
def test_resume_with_a_different_compression_completes_exactly_once(tmp_path, first, second):
    import fastattr

    model = Flaky().eval()
    data = np.random.default_rng(2).standard_normal((24, 3, 8, 8)).astype(np.float32)
    data[13, 0, 0, 0] = 1000  # batches of 4: the 4th fails, 3 shards of 4 are stored
    opts = dict(method="saliency", examples_per_batch=4, shard_size=4, progress=False)
    Flaky.broken = True
    try:
        with pytest.raises(OSError, match="disk went away"):
            fastattr.run(model, data, tmp_path / "run", compression=first, **opts)
    finally:
        Flaky.broken = False
    kept = filters(tmp_path / "run")
    assert len(kept) == 3 and set(kept) == {None if first == "none" else first}  # samples 0..11 stored
    summary = fastattr.run(model, data, tmp_path / "run", compression=second, **opts)  # resumes, never refused
    assert summary.complete and summary.computed == 12
    new = filters(tmp_path / "run")[3:]
    assert len(new) == 3 and set(new) <= ({None, "gzip"} if second == "auto" else {None if second == "none" else second})
    fastattr.run(model, data, tmp_path / "fresh", **opts)
    with fastattr.open(tmp_path / "run") as got, fastattr.open(tmp_path / "fresh") as want:
        assert np.array_equal(got.field("index"), np.arange(24))
        a, b = got[:], want[:]
        assert a["attributions"]["x"].tobytes() == b["attributions"]["x"].tobytes() and np.array_equal(a["target"], b["target"])
    report = verify_run(tmp_path / "run")
    assert report.ok and report.samples == 24


def test_info_names_the_filters_the_shards_hold_after_a_resume_with_another_compression(tmp_path):
    """The config keeps the last compression given; `fastattr info` said "storage: float32 none" for a
    run whose first 3 shards are gzip. It now reads the filters from the shards."""
    import fastattr

    model = Flaky().eval()
    data = np.random.default_rng(2).standard_normal((24, 3, 8, 8)).astype(np.float32)
    data[13, 0, 0, 0] = 1000
    opts = dict(method="saliency", examples_per_batch=4, shard_size=4, progress=False)
    Flaky.broken = True
    try:
        with pytest.raises(OSError, match="disk went away"):
            fastattr.run(model, data, tmp_path / "run", compression="gzip", **opts)
    finally:
        Flaky.broken = False
    fastattr.run(model, data, tmp_path / "run", compression="none", **opts)
    with fastattr.open(tmp_path / "run") as store:
        assert store.compressions() == {"gzip": 3, "none": 3}
    info = subprocess.run([sys.executable, "-m", "fastattr", "info", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "storage: float32 gzip (3 shards), none (3 shards), model mode" in info.stdout, info.stdout


RUN_CHILD = r"""
import os, sys, time, numpy as np, torch
import fastattr

class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 5)

    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW", "0")))
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))

data = np.load(sys.argv[2], mmap_mode="r")
s = fastattr.run(Slow().eval(), data, sys.argv[1], "saliency", compression="gzip", shard_size=16, examples_per_batch=8, progress=False)
print(s.computed, s.complete)
"""


def test_sigkill_during_a_gzip_run_loses_nothing_finalized_and_a_rerun_completes_exactly_once(tmp_path):
    # fastattr.run itself, killed while the pool encodes: 3x48x48 rows (9 per chunk), blocks of 8 and
    # shards of 16, so chunks wait across blocks and every shard ends in a padded partial chunk
    (tmp_path / "child.py").write_text(RUN_CHILD)
    x = np.random.default_rng(4).standard_normal((240, 3, 48, 48)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "FASTATTR_ENCODE_THREADS": "2"}
    cmd = [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "run"), str(tmp_path / "x.npy")]
    proc = subprocess.Popen(cmd, env={**env, "SLOW": "0.1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = tmp_path / "run" / "manifest.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if manifest.exists() and len(json.loads(manifest.read_text()).get("shards", [])) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        else:
            pytest.fail("no shard was finalized in time")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    listed = {e["file"]: e["sha256"] for e in json.loads(manifest.read_text())["shards"]}
    kept = sum(e["stop"] - e["start"] for e in json.loads(manifest.read_text())["shards"])
    assert 2 <= len(listed) and kept < 240
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(240 - kept), "True"]  # exactly the samples not finalized before the kill
    after = {e["file"]: e["sha256"] for e in json.loads(manifest.read_text())["shards"]}
    assert all(after[f] == h for f, h in listed.items())  # every finalized shard kept as it was
    fresh = subprocess.run([*cmd[:2], str(tmp_path / "fresh"), cmd[3]], env=env, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got, want = {}, {}
    for run, out in (("run", got), ("fresh", want)):
        for e in json.loads((tmp_path / run / "manifest.json").read_text())["shards"]:
            with h5py.File(tmp_path / run / e["file"], "r") as f:  # plain h5py: fletcher32 checked per chunk
                for i, row in zip(f["index"][()], f["attributions/x"][()]):
                    assert int(i) not in out  # every sample once
                    out[int(i)] = row.tobytes()
    assert sorted(got) == list(range(240)) and got == want
    report = verify_run(tmp_path / "run")
    assert report.ok and report.samples == 240


TORCHRUN_CHILD = r"""
import sys, numpy as np, torch, fastattr
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5)).eval()
x = np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32)
x[:24] = 0  # rank 0's half: zero attributions, which compress; rank 1's do not
fastattr.run(model, x, sys.argv[1], "input_x_gradient", shard_size=8, examples_per_batch=8, progress=False, target=1)
"""


def test_torchrun_ranks_choose_their_own_filters_and_the_merged_run_reads_back(tmp_path):
    """compression='auto' under torchrun: rank 0's shards are gzip, rank 1's none; the merged
    manifest lists all, plain h5py reads every sample once, verify passes, info names both."""
    import shutil

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if not torchrun or not torch.distributed.is_available():
        pytest.skip("torchrun / torch.distributed not available")
    (tmp_path / "child.py").write_text(TORCHRUN_CHILD)
    env = {**os.environ, "FASTATTR_DIST_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(tmp_path / "child.py"), str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    seen: dict[int, str | None] = {}
    for e in json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"]:
        with h5py.File(tmp_path / "run" / e["file"], "r") as f:
            for i in f["index"][()]:
                assert int(i) not in seen
                seen[int(i)] = f["attributions/x"].compression
    assert sorted(seen) == list(range(48))
    assert {seen[i] for i in range(24)} == {"gzip"} and {seen[i] for i in range(24, 48)} == {None}
    assert verify_run(tmp_path / "run").ok
    import fastattr

    with fastattr.open(tmp_path / "run") as store:
        assert store.compressions() == {"gzip": 3, "none": 3} and len(store) == 48
