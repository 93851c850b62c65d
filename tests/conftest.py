"""Shared pytest setup for fastattr's tests."""

from __future__ import annotations

import importlib.util
import os
import sys

# Before anything imports triton (torch.compile's inductor does): kernels run in the interpreter on
# CPU tensors unless the caller says otherwise (TRITON_INTERPRET=0 on a GPU machine).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models on one intra-op thread: on a shared 2-core machine, a second
    busy process stalls torch's OpenMP barriers and makes small-op tests many times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Triton kernels runnable here: on CUDA as they are, on CPU under the interpreter (skips when
    triton is missing, or was imported without TRITON_INTERPRET=1: the flag is read at import)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported without TRITON_INTERPRET=1")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
