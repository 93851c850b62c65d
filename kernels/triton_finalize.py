"""Triton finalize: attr = acc * (inputs - baselines), cast to out_dtype, with per-row Stats.

One pass: each program owns one (row, F-block) tile, reads acc/inputs/baselines once,
writes attr once and reduces its tile's finite products to five partials (sum, l1,
sum of squares, absmax, nonfinite count) stored in a small (5, B, n_blocks) buffer.
A tiny deterministic torch reduction over n_blocks (about F / 1024 values a row)
then gives the Stats; sqrt is applied after the sum of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .checks import check_accumulator, check_dtype, check_rows, check_same_device_and_dense
from .reference import Stats


@triton.jit
def _finalize_kernel(
    acc_ptr, in_ptr, base_ptr, out_ptr, part_ptr, cnt_ptr, F, n_fblocks, part_plane,
    HAS_INPUTS: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # == row * n_fblocks + fblock: the partial's index
    row = pid // n_fblocks
    offs = (pid % n_fblocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    idx = row * F + offs  # int64
    attr = tl.load(acc_ptr + idx, mask=mask, other=0.0)
    if HAS_INPUTS:
        diff = tl.load(in_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_BASE:
            diff -= tl.load(base_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        attr = attr * diff
    tl.store(out_ptr + idx, attr.to(out_ptr.dtype.element_ty), mask=mask)
    finite = (attr == attr) & (tl.abs(attr) != float("inf"))
    clean = tl.where(finite & mask, attr, 0.0)
    a = tl.abs(clean)
    tl.store(part_ptr + pid, tl.sum(clean, axis=0))
    tl.store(part_ptr + part_plane + pid, tl.sum(a, axis=0))
    tl.store(part_ptr + 2 * part_plane + pid, tl.sum(clean * clean, axis=0))
    tl.store(part_ptr + 3 * part_plane + pid, tl.max(a, axis=0))
    tl.store(cnt_ptr + pid, tl.sum((mask & ~finite).to(tl.int32), axis=0))


def finalize_triton(
    acc: torch.Tensor,
    inputs: torch.Tensor | None = None,
    baselines: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, Stats]:
    """attr = acc * (inputs - baselines) cast to out_dtype, and per-row Stats over finite values.

    acc (B, F) float32 contiguous; inputs/baselines (B, F) float32/bfloat16/float16
    contiguous or None (baselines None = zeros; inputs None = a new copy of acc, and
    baselines is then ignored, as in the reference). out_dtype float32/bfloat16/float16,
    default acc.dtype. Stats are taken on the fp32 product before the cast.
    """
    name = "finalize"
    B, F = check_accumulator(name, "acc", acc)
    out_dtype = out_dtype or acc.dtype
    check_dtype(name, "out_dtype", out_dtype)
    if inputs is None:
        baselines = None
    for arg, t in (("inputs", inputs), ("baselines", baselines)):
        if t is not None:
            check_rows(name, arg, t, B, F, "acc")
    check_same_device_and_dense(
        name, ("acc", acc), {"inputs": inputs, "baselines": baselines}, {"acc": acc, "inputs": inputs, "baselines": baselines}
    )

    out = torch.empty((B, F), dtype=out_dtype, device=acc.device)
    if B == 0 or F == 0:
        z = torch.zeros(B, dtype=torch.float32, device=acc.device)
        return out, Stats(z, z.clone(), z.clone(), z.clone(), torch.zeros(B, dtype=torch.int32, device=acc.device))
    n_fblocks, grid = launch.row_tiles(B, F)
    part = torch.empty((4, B, n_fblocks), dtype=torch.float32, device=acc.device)
    cnt = torch.empty((B, n_fblocks), dtype=torch.int32, device=acc.device)
    _finalize_kernel[grid](
        acc, inputs if inputs is not None else acc, baselines if baselines is not None else acc, out, part, cnt,
        F, n_fblocks, B * n_fblocks,
        HAS_INPUTS=inputs is not None, HAS_BASE=baselines is not None, BLOCK=launch.BLOCK_F, num_warps=launch.NUM_WARPS,
    )
    sums = part[:3].sum(2)
    stats = Stats(
        sum=sums[0], l1=sums[1], l2=sums[2].sqrt(), absmax=part[3].amax(1), nonfinite=cnt.sum(1, dtype=torch.int32)
    )
    return out, stats
