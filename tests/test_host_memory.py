"""CPU runs reuse freed host pages (fastattr/host_memory.py): inside ``reuse_freed_pages`` a large
temporary allocated again and again stops page-faulting; outside (and after) glibc maps, faults in
and unmaps every such block, as by default."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from fastattr.host_memory import _libc, reuse_freed_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None, reason="glibc only")


def faults_per_temporary() -> list[int]:
    """Minor page faults of each of 6 (64, 150528) float32 temporaries (38.5 MB: above glibc's 32 MiB mmap threshold)."""
    x = torch.ones(64, 150528)
    out = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x.abs()
        del y
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


FRESH_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_host_memory import faults_per_temporary
from fastattr.host_memory import reuse_freed_pages
before = faults_per_temporary()
with reuse_freed_pages():
    inside = faults_per_temporary()
print(json.dumps([before, inside, faults_per_temporary()]))
"""


def test_freed_pages_are_reused_only_inside_the_context():
    # in a fresh process: free chunks that earlier tests leave in this process's heap can serve (or
    # delay) the temporaries, which made the in-process version fail now and then
    import json
    import os
    import subprocess

    pages = 64 * 150528 * 4 // resource.getpagesize()
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, os.path.dirname(__file__)], capture_output=True, text=True, timeout=300, check=True)
    before, inside, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert min(before) > pages // 2  # default: every temporary is mapped and faulted in afresh
    assert inside[-1] < pages // 100 and inside[-2] < pages // 100  # once the heap holds a freed block: reused
    assert min(after) > pages // 2  # restored: the process behaves as before


def test_opt_out(monkeypatch):
    monkeypatch.setenv("FASTATTR_REUSE_PAGES", "0")
    pages = 64 * 150528 * 4 // resource.getpagesize()
    with reuse_freed_pages():
        assert min(faults_per_temporary()) > pages // 2


# A child process's test of glibc: mapped(n) says whether a malloc of n bytes gets a mapping of its own
MAPPED = """
import ctypes

libc = ctypes.CDLL("libc.so.6")


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]


def mapped(size):
    before = libc.mallinfo2().hblks  # blocks glibc serves with their own mapping
    p = libc.malloc(size)
    n = libc.mallinfo2().hblks - before
    libc.free(p)
    return n == 1
"""

USER_SETTING = (
    """
import ctypes
from fastattr.host_memory import reuse_freed_pages

"""
    + MAPPED
    + """


states = [mapped(1 << 20)]
with reuse_freed_pages():
    states.append(mapped(1 << 20))
states.append(mapped(1 << 20))
print(states)
"""
)


@pytest.mark.parametrize(
    "env", [{"MALLOC_MMAP_THRESHOLD_": "262144"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=262144"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=262144"}]
)
def test_the_users_glibc_thresholds_win(env):
    """A process started with a 256 KiB mmap threshold (glibc's environment variable or its tunable)
    maps a 1 MiB block before, inside and after the context: fastattr leaves the user's setting alone.
    Before: GLIBC_TUNABLES was overridden during the run and replaced by 32 MiB after it."""
    import os
    import subprocess

    if not hasattr(_libc(), "mallinfo2"):
        pytest.skip("glibc before 2.33")
    out = subprocess.run([sys.executable, "-c", USER_SETTING], env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[True, True, True]", out.stdout + out.stderr


INTERRUPTED_RUN = (
    """
import ctypes, os, signal, sys, tempfile
import numpy as np
import torch
from torch import nn
import fastattr
from fastattr import host_memory

"""
    + MAPPED
    + """


class Interrupting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 3)
        self.calls, self.inside = 0, None

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            self.inside = mapped(48 << 20)
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to the main thread in the run
        return self.lin(x)


before = mapped(48 << 20)
model = Interrupting()
x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
try:
    fastattr.run(model, x, os.path.join(tempfile.mkdtemp(), "r"), "saliency", examples_per_batch=8, progress=False)
    print("not interrupted")
except KeyboardInterrupt:
    print([before, model.inside, mapped(48 << 20), host_memory._active])
"""
)


def test_thresholds_restored_after_a_ctrl_c_in_a_run():
    """A SIGINT in the middle of a CPU run: a 48 MiB block is mapped before the run, comes from the
    heap inside it, and is mapped again after the KeyboardInterrupt (thresholds restored, no run left
    counted)."""
    import subprocess

    if not hasattr(_libc(), "mallinfo2"):
        pytest.skip("glibc before 2.33")
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_RUN], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[True, False, True, 0]", out.stdout + out.stderr


def test_overlapping_runs_in_threads_restore_only_when_the_last_one_leaves(monkeypatch):
    """Two threads' runs overlap (A enters, B enters, A leaves, B leaves): glibc's thresholds are raised
    when A enters and set back only when B leaves (libc recorded; the real effect: the SIGINT test)."""
    import threading

    from fastattr import host_memory

    calls: list[str] = []

    class Recorder:
        def mallopt(self, param: int, value: int) -> int:
            calls.append(f"mallopt {param} {value}")
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append("trim")
            return 1

    monkeypatch.setattr(host_memory, "_libc", lambda: Recorder())
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def run_a() -> None:
        with reuse_freed_pages():
            a_in.set()
            b_in.wait(30)
        a_out.set()

    def run_b() -> None:
        a_in.wait(30)
        with reuse_freed_pages():
            seen["both in"] = len(calls)
            b_in.set()
            a_out.wait(30)
            seen["b alone"] = len(calls)

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    raised = [f"mallopt {host_memory.M_MMAP_THRESHOLD} {host_memory.RUN_THRESHOLD}", f"mallopt {host_memory.M_TRIM_THRESHOLD} {2 * host_memory.RUN_THRESHOLD}"]
    restored = [f"mallopt {host_memory.M_MMAP_THRESHOLD} {host_memory.SETTLED_MMAP}", f"mallopt {host_memory.M_TRIM_THRESHOLD} {host_memory.SETTLED_TRIM}", "trim"]
    assert seen == {"both in": 2, "b alone": 2} and calls == raised + restored and host_memory._active == 0


@pytest.mark.parametrize("platform", ["darwin", "linux-musl"])
def test_other_c_libraries_are_left_alone(monkeypatch, platform):
    """macOS: libc is never loaded; a Linux libc without glibc's entry points (musl): never called."""
    import ctypes

    from fastattr import host_memory

    class Musl:  # none of glibc's entry points (mallopt, malloc_trim, gnu_get_libc_version)
        def __getattr__(self, name: str):
            raise AttributeError(name)

    def cdll(*a, **k):
        if platform == "darwin":
            raise AssertionError("libc loaded on macOS")
        return Musl()

    monkeypatch.setattr(host_memory.sys, "platform", "darwin" if platform == "darwin" else "linux")
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert host_memory._libc() is None
    with reuse_freed_pages():
        assert host_memory._active == 0
