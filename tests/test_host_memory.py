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


def test_freed_pages_are_reused_only_inside_the_context():
    pages = 64 * 150528 * 4 // resource.getpagesize()
    assert min(faults_per_temporary()) > pages // 2  # default: every temporary is mapped and faulted in afresh
    with reuse_freed_pages():
        inside = faults_per_temporary()
    assert inside[-1] < pages // 100 and inside[-2] < pages // 100  # once the heap holds a freed block: reused
    assert min(faults_per_temporary()) > pages // 2  # restored: the process behaves as before


def test_opt_out(monkeypatch):
    monkeypatch.setenv("FASTATTR_REUSE_PAGES", "0")
    pages = 64 * 150528 * 4 // resource.getpagesize()
    with reuse_freed_pages():
        assert min(faults_per_temporary()) > pages // 2
