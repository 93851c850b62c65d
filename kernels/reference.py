"""Torch reference implementations of fastattr's reduction kernels.

These are the ground truth the Triton kernels are tested against, and the path
used on CPU (and wherever Triton is unavailable). Shapes are flat: the engine
views every attribution tensor as (rows, features).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Stats(NamedTuple):
    """Per-sample statistics over the finite elements of an attribution row."""

    sum: torch.Tensor  # (B,) float32
    l1: torch.Tensor  # (B,) float32
    l2: torch.Tensor  # (B,) float32
    absmax: torch.Tensor  # (B,) float32
    nonfinite: torch.Tensor  # (B,) int32


def path_accumulate(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """acc[b, :] += sum_s w[s(, b)] * grads[s, b, :], in acc's dtype; returns acc."""
    w = weights.to(acc.dtype)
    if grads.shape[0] == 1 and w.dim() == 1 and acc.device.type == "cpu" and float(w[0]) == 1.0:
        acc.add_(grads[0].to(acc.dtype))  # plain gradients: the same sum, without einsum's (B, F) temporary
    elif w.dim() == 1:
        acc += torch.einsum("s,sbf->bf", w, grads.to(acc.dtype))
    else:
        acc += torch.einsum("sb,sbf->bf", w, grads.to(acc.dtype))
    return acc


def finalize(
    acc: torch.Tensor,
    inputs: torch.Tensor | None = None,
    baselines: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    copy: bool = True,
) -> tuple[torch.Tensor, Stats]:
    """attr = acc * (inputs - baselines) (acc alone when inputs is None), plus stats.

    baselines None means zeros. Statistics are taken on the full-precision product,
    before the cast to out_dtype, over finite elements only. copy=False: the result may be
    acc itself (for a caller that copies it anyway or never touches acc again).
    """
    attr = acc if inputs is None else acc * (inputs.to(acc.dtype) - (0 if baselines is None else baselines.to(acc.dtype)))
    # a finite sum proves every value finite (NaN/inf make it non-finite): skip the mask and the masked copy
    all_finite = attr.numel() > 0 and bool(torch.isfinite(attr.sum()))
    finite = None if all_finite else torch.isfinite(attr)
    clean = attr if finite is None else torch.where(finite, attr, torch.zeros((), dtype=attr.dtype, device=attr.device))
    absval = clean.abs()
    red = torch.promote_types(attr.dtype, torch.float32)  # float64 attr keeps float64 sums
    total, l1 = clean.sum(1, dtype=red).float(), absval.sum(1, dtype=red).float()
    absmax = absval.amax(1).float() if attr.shape[1] else torch.zeros(attr.shape[0], device=attr.device)
    # the squares go into absval's buffer: one (B, F) temporary fewer (fresh host memory is page-faulted in)
    l2 = torch.square(clean, out=absval).sum(1).sqrt().float()
    nonfinite = torch.zeros(attr.shape[0], dtype=torch.int32, device=attr.device) if finite is None else (~finite).sum(1, dtype=torch.int32)
    # copy when attr aliases acc, so callers may reuse the accumulator
    return attr.to(out_dtype or acc.dtype, copy=copy and inputs is None), Stats(total, l1, l2, absmax, nonfinite)


def moments(
    sum_g: torch.Tensor, sum_sq: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_g += sum_s w g and sum_sq += sum_s w g^2 over grads (S, B, F); returns both."""
    g = grads.to(sum_g.dtype)
    if weights is None:
        sum_g += g.sum(0)
        sum_sq += g.square().sum(0)
    else:
        w = weights.to(sum_g.dtype)
        w = w[:, None, None] if w.dim() == 1 else w[:, :, None]
        sum_g += (w * g).sum(0)
        sum_sq += (w * g.square()).sum(0)
    return sum_g, sum_sq


def channel_reduce(x: torch.Tensor, dim: int, mode: str = "sum", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reduce x over dim by 'sum', 'abs' (sum of absolute values) or 'l2', then cast."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if mode == "sum":
        out = xf.sum(dim)
    elif mode == "abs":
        out = xf.abs().sum(dim)
    elif mode == "l2":
        out = xf.square().sum(dim).sqrt()
    else:
        raise ValueError(f"channel_reduce: mode must be 'sum', 'abs' or 'l2', got {mode!r}")
    return out.to(out_dtype or xf.dtype)
