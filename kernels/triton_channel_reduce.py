"""Triton channel_reduce: reduce x over one dim by 'sum', 'abs' or 'l2', fused with the output cast.

x is viewed as (outer, C, inner) and reduced over C in fp32. One pass: every element
of x is read once and every output written once, already in out_dtype.
- inner > 1: each program owns a [BLOCK_O, BLOCK_I] tile of the (outer, inner) output
  and loops over C; loads along inner are contiguous.
- inner == 1 (reducing the last dim): each program owns BLOCK_R rows and sweeps C in
  contiguous BLOCK_C chunks, so loads stay coalesced for long rows.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch
from .checks import check_dtype, check_same_device_and_dense

_MODES = {"sum": 0, "abs": 1, "l2": 2}


@triton.jit
def _transform(v, MODE: tl.constexpr):
    if MODE == 1:
        v = tl.abs(v)
    elif MODE == 2:
        v = v * v
    return v


@triton.jit
def _reduce_mid_kernel(
    x_ptr, out_ptr, outer, C, inner, n_iblocks,
    MODE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = (pid // n_iblocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (pid % n_iblocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (o < outer)[:, None] & (i < inner)[None, :]
    ptrs = x_ptr + (o * C * inner)[:, None] + i[None, :]  # int64 offsets
    total = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for _ in range(C):
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        total += _transform(v, MODE)
        ptrs += inner
    if MODE == 2:
        total = tl.sqrt(total)
    out = out_ptr + (o * inner)[:, None] + i[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_last_kernel(x_ptr, out_ptr, rows, C, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    total = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (c < C)[None, :]
        v = tl.load(x_ptr + (r * C)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        total += _transform(v, MODE)
    res = tl.sum(total, axis=1)
    if MODE == 2:
        res = tl.sqrt(res)
    tl.store(out_ptr + r, res.to(out_ptr.dtype.element_ty), mask=rmask)


def channel_reduce_triton(x: torch.Tensor, dim: int, mode: str = "sum", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reduce x over ``dim`` by 'sum', 'abs' (sum of |x|) or 'l2' (sqrt of sum of squares).

    x float32/bfloat16/float16, contiguous, at least 1-d; dim may be negative. The result
    has x.shape without dim, in out_dtype (float32/bfloat16/float16; default float32
    for half inputs, else x.dtype). Accumulation is fp32.
    """
    name = "channel_reduce"
    if mode not in _MODES:
        raise ValueError(f"{name}: mode must be 'sum', 'abs' or 'l2', got {mode!r}")
    check_dtype(name, "x", x.dtype)
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{name}: dim must be in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}; got {dim}")
    check_same_device_and_dense(name, ("x", x), {}, {"x": x})
    out_dtype = out_dtype or (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    check_dtype(name, "out_dtype", out_dtype)
    dim = dim % x.dim()
    outer, C, inner = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :])
    out_shape = x.shape[:dim] + x.shape[dim + 1 :]
    if C == 0:
        return torch.zeros(out_shape, dtype=out_dtype, device=x.device)
    out = torch.empty(out_shape, dtype=out_dtype, device=x.device)
    if outer * inner == 0:
        return out
    mode_id = _MODES[mode]
    if inner == 1:
        block_c = min(triton.next_power_of_2(C), 256)
        block_r = max(launch.TILE // block_c, 1)
        grid = (triton.cdiv(outer, block_r),)
        _reduce_last_kernel[grid](x, out, outer, C, MODE=mode_id, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=launch.NUM_WARPS)
    else:
        block_i = min(triton.next_power_of_2(inner), launch.TILE)
        block_o = launch.TILE // block_i
        n_iblocks = triton.cdiv(inner, block_i)
        grid = (triton.cdiv(outer, block_o) * n_iblocks,)
        _reduce_mid_kernel[grid](
            x, out, outer, C, inner, n_iblocks, MODE=mode_id, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=launch.NUM_WARPS
        )
    return out
