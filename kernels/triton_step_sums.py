"""Triton step sums over grads (S, B, F), in place: one kernel for two ops.

- path_accumulate: acc += sum_s w g            (SECOND=False)
- moments:         sum_g += sum_s w g, sum_sq += sum_s w g^2   (SECOND=True)

path_accumulate is moments without the second sum, so both launch the same kernel with a
constexpr flag. One pass: each program owns one (row, F-block) tile, loops over the S steps
reading every gradient element once, keeps the running sums in fp32 registers and does one
read-modify-write of each accumulator. Traffic is grads + 2 * accumulators, the minimum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .checks import check_accumulator, check_rows, check_same_device_and_dense, check_step_grads


@triton.jit
def _step_sums_kernel(
    sum_ptr, sq_ptr, grads_ptr, w_ptr, S, plane, F, n_fblocks, w_stride_s, w_stride_b,
    HAS_W: tl.constexpr, SECOND: tl.constexpr, BLOCK: tl.constexpr,
):
    # plane = B * F; pointers advance by it per step, so offsets never overflow int32
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_fblocks
    offs = (pid % n_fblocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    row_off = row * F + offs  # int64
    g_ptrs = grads_ptr + row_off
    w_ptrs = w_ptr + row * w_stride_b
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(S):
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            wg = tl.load(w_ptrs) * g
            w_ptrs += w_stride_s
        else:
            wg = g
        s1 += wg
        if SECOND:
            s2 += wg * g
        g_ptrs += plane
    t1 = tl.load(sum_ptr + row_off, mask=mask, other=0.0)
    tl.store(sum_ptr + row_off, t1 + s1, mask=mask)
    if SECOND:
        t2 = tl.load(sq_ptr + row_off, mask=mask, other=0.0)
        tl.store(sq_ptr + row_off, t2 + s2, mask=mask)


def _launch(sum_g: torch.Tensor, sum_sq: torch.Tensor | None, grads: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Launch over checked arguments; sum_sq None runs the first sum only."""
    B, F = sum_g.shape
    S = grads.shape[0]
    if B == 0 or F == 0 or S == 0:
        return
    if weights is None:
        w, w_stride_s, w_stride_b = grads, 0, 0  # w is a placeholder; HAS_W=False never reads it
    else:
        w = weights.to(torch.float32).contiguous()
        w_stride_s, w_stride_b = w.stride(0), (w.stride(1) if w.dim() == 2 else 0)
    n_fblocks, grid = launch.row_tiles(B, F)
    _step_sums_kernel[grid](
        sum_g, sum_g if sum_sq is None else sum_sq, grads, w, S, B * F, F, n_fblocks, w_stride_s, w_stride_b,
        HAS_W=weights is not None, SECOND=sum_sq is not None, BLOCK=launch.BLOCK_F, num_warps=launch.NUM_WARPS,
    )  # fmt: skip


def path_accumulate_triton(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """In place acc[b, :] += sum_s weights[s(, b)] * grads[s, b, :]; returns acc.

    acc (B, F) float32 contiguous; grads (S, B, F) float32/bfloat16/float16 contiguous;
    weights (S,) or (S, B), any float dtype (cast to float32 here).
    """
    name = "path_accumulate"
    B, F = check_accumulator(name, "acc", acc)
    check_step_grads(name, grads, weights, B, F, "acc")
    check_same_device_and_dense(name, ("acc", acc), {"grads": grads, "weights": weights}, {"acc": acc, "grads": grads})
    _launch(acc, None, grads, weights)
    return acc


def moments_triton(
    sum_g: torch.Tensor, sum_sq: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place sum_g += sum_s w g, sum_sq += sum_s w g^2; returns (sum_g, sum_sq).

    sum_g, sum_sq (B, F) float32 contiguous; grads (S, B, F) float32/bfloat16/float16
    contiguous; weights None (all ones), (S,) or (S, B), any float dtype.
    """
    name = "moments"
    B, F = check_accumulator(name, "sum_g", sum_g)
    check_rows(name, "sum_sq", sum_sq, B, F, "sum_g", allowed=(torch.float32,))
    check_step_grads(name, grads, weights, B, F, "sum_g")
    check_same_device_and_dense(
        name, ("sum_g", sum_g), {"sum_sq": sum_sq, "grads": grads, "weights": weights}, {"sum_g": sum_g, "sum_sq": sum_sq, "grads": grads}
    )
    _launch(sum_g, sum_sq, grads, weights)
    return sum_g, sum_sq
