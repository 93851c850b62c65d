"""benchmarks/_harness.py: the timing, memory and error plumbing every benchmark script shares."""

from __future__ import annotations

import ast
import json
import os
import sys
import time

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCH)
import _harness as h  # noqa: E402


def test_timed_synchronizes_on_cuda(monkeypatch):
    """A CUDA timing must wait for the queued work before reading the clock, around every timed call."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seconds, peak, out = h.timed(lambda: events.append("call") or 7, torch.device("cuda"), repeats=2, memory=False)
    assert out == 7 and peak is None and seconds >= 0
    assert events == ["call", "sync", "call", "sync", "sync", "call", "sync"]  # warm-up, then sync-call-sync twice


def test_timed_on_cpu_never_touches_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronized on a CPU timing"))
    seconds, peak, out = h.timed(lambda: 3, "cpu", repeats=3, memory=False)
    assert out == 3 and seconds >= 0 and peak is None


def test_peak_memory_cpu_sees_an_allocation():
    with h.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20)  # 256 MiB, written so the pages are resident
    assert mem.mb >= 200, mem.mb
    del x


def test_rel_err_over_the_reference_rows():
    ref = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    a = torch.tensor([[3.0, 4.5], [100.0, 100.0]])  # row 1 has no reference: ignored
    assert h.rel_err(a, ref) == pytest.approx(0.5 / 5.0)


def test_write_json_records_card_date_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTR_COMMIT", "abc123")
    path = h.write_json(str(tmp_path / "sub" / "r.json"), {"rows": [h.Row("case", "impl", 1.0, 2.0, 3e-3)]})
    with open(path) as f:
        data = json.load(f)
    assert data["env"]["commit"] == "abc123" and data["env"]["card"] and data["env"]["date"]
    assert data["rows"][0]["impl"] == "impl"
    assert h.table([h.Row("c", "i", None, None, None, note="out of memory")]).splitlines()[-1] == "| c | i | - | - | - | - | - | out of memory |"


SCRIPTS = sorted(f for f in os.listdir(BENCH) if f.startswith("bench_") and f.endswith(".py")) + ["gpu_suite.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_uses_the_harness(script):
    """Every script imports _harness, none defines its own rel_err, PeakMemory or synchronizing timer,
    and none reaches into tests/."""
    with open(os.path.join(BENCH, script)) as f:
        source = f.read()
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "_harness" in imported
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"rel_err", "PeakMemory", "_max_rel", "max_rel"}, defined
    path_inserts = [ast.get_source_segment(source, n) for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "sys.path.insert"]
    assert not [p for p in path_inserts if "tests" in p], path_inserts
    assert not imported & {"token_models", "conftest"}


def test_timings_carry_cpu_time_and_still_unpack_as_three():
    """cpu_seconds is the process's CPU time, not the wall time: a sleep costs wall time only."""
    for timing in (h.measure_once(lambda: time.sleep(0.2) or 5, "cpu", memory_on=None), h.timed(lambda: time.sleep(0.2) or 5, "cpu", repeats=1, memory=False)):
        seconds, peak, out = timing
        assert out == 5 and peak is None and seconds >= 0.2 and timing.seconds == seconds
        assert 0 <= timing.cpu_seconds < 0.1, timing.cpu_seconds
    busy = h.measure_once(lambda: sum(i * i for i in range(5_000_000)), "cpu", memory_on=None)  # ~0.3 s of CPU
    assert busy.cpu_seconds > 0.05, busy.cpu_seconds  # what the loop costs does not depend on the machine's load


def test_best_of_keeps_the_best_call_and_never_times_before(monkeypatch):
    events = []
    sleeps = iter([0.3, 0.05, 0.2])
    timing = h.best_of(lambda: events.append("call") or time.sleep(next(sleeps)), "cpu", repeats=3, before=lambda: events.append("before") or time.sleep(0.3))
    assert events == ["before", "call"] * 3  # no warm-up: a cold-cache read stays cold
    assert 0.05 <= timing.seconds < 0.2 and timing.peak_mb is None, timing.seconds
    events.clear()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    h.best_of(lambda: events.append("call"), torch.device("cuda"), repeats=1)
    assert events == ["sync", "call", "sync"]
