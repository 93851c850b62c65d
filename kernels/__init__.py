"""fastattr.kernels: the reductions on the attribution hot path.

Each op has a torch reference (kernels/reference.py) and a Triton launcher: path_accumulate
and moments share one kernel (kernels/triton_step_sums.py), finalize and channel_reduce have
their own (kernels/triton_<op>.py); launch settings live in kernels/launch.py and argument
checks in kernels/checks.py. ``backend`` picks the path:

- "auto" (default): Triton for CUDA tensors when triton imports, the reference otherwise;
- "triton": always Triton (on CPU tensors this needs TRITON_INTERPRET=1 set before import);
- "torch": always the reference.

The environment variable FASTATTR_KERNELS sets the default backend. Importing this
module never requires triton.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

from . import reference
from .reference import Stats

__all__ = ["Stats", "path_accumulate", "finalize", "moments", "channel_reduce", "triton_available", "resolve_backend"]

_BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Return 'triton' or 'torch' for an op on ``tensor``."""
    backend = backend or os.environ.get("FASTATTR_KERNELS", "auto")
    if backend not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {backend!r} (argument or FASTATTR_KERNELS)")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("kernel backend 'triton' was requested but triton cannot be imported")
    return backend


# op -> the module holding its Triton launcher ``<op>_triton`` (imported on first use: triton is optional)
_TRITON_MODULES = {
    "path_accumulate": "triton_step_sums",
    "moments": "triton_step_sums",
    "finalize": "triton_finalize",
    "channel_reduce": "triton_channel_reduce",
}


def _triton_op(name: str) -> Callable[..., Any]:
    module = importlib.import_module(f"{__name__}.{_TRITON_MODULES[name]}")
    return getattr(module, f"{name}_triton")


def _on(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU: Triton launches on the current CUDA device and its stream, not the
    tensors' (tensors on cuda:1 with cuda:0 current would be read from the wrong device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def path_accumulate(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """In place: acc[b, :] += sum_s weights[s(, b)] * grads[s, b, :]. Returns acc.

    acc (B, F) float32 (float64 takes the reference path); grads (S, B, F) float32,
    bfloat16 or float16; weights (S,) shared by all rows or (S, B) per row.
    """
    if resolve_backend(backend, acc) == "triton" and acc.dtype == torch.float32:
        with _on(acc):
            return _triton_op("path_accumulate")(acc, grads, weights)
    return reference.path_accumulate(acc, grads, weights)


def finalize(
    acc: torch.Tensor,
    inputs: torch.Tensor | None = None,
    baselines: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    copy: bool = True,
) -> tuple[torch.Tensor, Stats]:
    """attr = acc * (inputs - baselines) (acc alone when inputs is None), cast to out_dtype,
    with per-row Stats (sum, l1, l2, absmax over finite elements; nonfinite count).
    copy=False: the result may alias acc (the caller copies it anyway or drops acc)."""
    if resolve_backend(backend, acc) == "triton" and acc.dtype == torch.float32:
        with _on(acc):
            return _triton_op("finalize")(acc, inputs, baselines, out_dtype=out_dtype)
    return reference.finalize(acc, inputs, baselines, out_dtype, copy)


def moments(
    sum_g: torch.Tensor,
    sum_sq: torch.Tensor,
    grads: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: sum_g += sum_s w g, sum_sq += sum_s w g^2 for grads (S, B, F)."""
    if resolve_backend(backend, sum_g) == "triton" and sum_g.dtype == torch.float32:
        with _on(sum_g):
            return _triton_op("moments")(sum_g, sum_sq, grads, weights)
    return reference.moments(sum_g, sum_sq, grads, weights)


def channel_reduce(
    x: torch.Tensor, dim: int, mode: str = "sum", *, out_dtype: torch.dtype | None = None, backend: str | None = None
) -> torch.Tensor:
    """Reduce x over ``dim`` by 'sum', 'abs' or 'l2', fused with the cast to out_dtype."""
    if resolve_backend(backend, x) == "triton" and x.dtype != torch.float64:
        with _on(x):
            return _triton_op("channel_reduce")(x, dim, mode, out_dtype=out_dtype)
    return reference.channel_reduce(x, dim, mode, out_dtype)
