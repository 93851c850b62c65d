"""Precision policies: how forward and backward run; accumulation is always fp32 (or fp64).

- "fp32": plain float32, TF32 matmuls off.
- "tf32": float32 tensors, TF32 tensor-core matmuls and convolutions on (CUDA only effect).
- "bf16": forward and backward under torch.autocast(bfloat16).
- "fp16": autocast(float16) with a scaled backward seed so small gradients do not
  underflow; a chunk whose gradients overflow (inf/NaN) is retried at a lower scale.

"auto" (POLICIES) is resolved to one of these by fastattr/probe.py before any engine exists.
Policies are context managers that restore every global flag they touch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTO = "auto"  # the fastest policy whose measured probe error is within a tolerance (fastattr/probe.py)
POLICIES = (*PRECISIONS, AUTO)  # what a user may ask for


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None
    allow_tf32: bool
    # fp16 only: initial backward-seed scale, and how many times a chunk may halve it
    initial_scale: float = 1.0
    max_retries: int = 0

    @property
    def scaled(self) -> bool:
        return self.initial_scale != 1.0

    @contextlib.contextmanager
    def flags(self) -> Iterator[None]:
        """TF32 flags for forward and backward; restored on exit."""
        try:
            saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        except RuntimeError:  # TF32 set through torch's fp32_precision API: torch refuses to read the legacy flags then
            saved = None
        if saved is None:
            with self._fp32_precision():
                yield
            return
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.allow_tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    @contextlib.contextmanager
    def _fp32_precision(self) -> Iterator[None]:
        """``flags`` through the fp32_precision API (cuBLAS matmuls, cuDNN convolutions and RNNs)."""
        parts = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
        saved = [p.fp32_precision for p in parts]
        for p in parts:
            p.fp32_precision = "tf32" if self.allow_tf32 else "ieee"
        try:
            yield
        finally:
            for p, value in zip(parts, saved):
                p.fp32_precision = value

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast for the forward (the backward follows the forward's dtypes by itself)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        if self.autocast_dtype == torch.float16 and device.type == "cpu" and not _warned_cpu_fp16:
            _warn_cpu_fp16()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


_warned_cpu_fp16 = False


def _warn_cpu_fp16() -> None:
    global _warned_cpu_fp16
    _warned_cpu_fp16 = True
    logger.warning("precision='fp16' on CPU runs emulated float16 kernels (measured 7-20x slower than fp32 here); use 'bf16' on CPU")


def get_precision(name: str | Precision) -> Precision:
    if isinstance(name, Precision):
        return name
    if name == "fp32":
        return Precision("fp32", None, allow_tf32=False)
    if name == "tf32":
        return Precision("tf32", None, allow_tf32=True)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, allow_tf32=False)
    if name == "fp16":
        # 2**12 keeps gradients of O(1e-8) above fp16's subnormal floor while leaving
        # headroom below its max (65504) for gradients up to ~16; overflow halves it.
        return Precision("fp16", torch.float16, allow_tf32=False, initial_scale=2.0**12, max_retries=24)
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
