"""Triton moments: sum_g += sum_s w g and sum_sq += sum_s w g^2 over grads (S, B, F), in place.

One pass: each program owns one (row, F-block) tile, loops over the S steps reading
every gradient element once, keeps both running sums in fp32 registers and does one
read-modify-write of each accumulator. Traffic is grads + 2 * (sum_g + sum_sq).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_same_device_and_dense, check_step_grads

BLOCK_F = 1024
NUM_WARPS = 4


@triton.jit
def _moments_kernel(
    sum_ptr, sq_ptr, grads_ptr, w_ptr, S, plane, F, n_fblocks, w_stride_s, w_stride_b,
    HAS_W: tl.constexpr, BLOCK: tl.constexpr,
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
            s1 += wg
            s2 += wg * g
            w_ptrs += w_stride_s
        else:
            s1 += g
            s2 += g * g
        g_ptrs += plane
    t1 = tl.load(sum_ptr + row_off, mask=mask, other=0.0)
    tl.store(sum_ptr + row_off, t1 + s1, mask=mask)
    t2 = tl.load(sq_ptr + row_off, mask=mask, other=0.0)
    tl.store(sq_ptr + row_off, t2 + s2, mask=mask)


def moments_triton(
    sum_g: torch.Tensor, sum_sq: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place sum_g += sum_s w g, sum_sq += sum_s w g^2; returns (sum_g, sum_sq).

    sum_g, sum_sq (B, F) float32 contiguous; grads (S, B, F) float32/bfloat16/float16
    contiguous; weights None (all ones), (S,) or (S, B), any float dtype.
    """
    name = "moments"
    if sum_g.dim() != 2:
        raise ValueError(f"{name}: sum_g must have shape (B, F); got {tuple(sum_g.shape)}")
    B, F = sum_g.shape
    if tuple(sum_sq.shape) != (B, F):
        raise ValueError(f"{name}: sum_sq must have shape (B, F)=({B}, {F}) like sum_g; got {tuple(sum_sq.shape)}")
    for arg, t in (("sum_g", sum_g), ("sum_sq", sum_sq)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: {arg} must be float32; got {t.dtype}")
    S = check_step_grads(name, grads, weights, B, F, "sum_g")
    check_same_device_and_dense(
        name, ("sum_g", sum_g), {"sum_sq": sum_sq, "grads": grads, "weights": weights}, {"sum_g": sum_g, "sum_sq": sum_sq, "grads": grads}
    )
    if B == 0 or F == 0 or S == 0:
        return sum_g, sum_sq
    if weights is None:
        w, w_stride_s, w_stride_b = grads, 0, 0  # w is a placeholder; HAS_W=False never reads it
    else:
        w = weights.to(torch.float32).contiguous()
        w_stride_s, w_stride_b = w.stride(0), (w.stride(1) if w.dim() == 2 else 0)
    n_fblocks = triton.cdiv(F, BLOCK_F)
    _moments_kernel[(B * n_fblocks,)](
        sum_g, sum_sq, grads, w, S, B * F, F, n_fblocks, w_stride_s, w_stride_b,
        HAS_W=weights is not None, BLOCK=BLOCK_F, num_warps=NUM_WARPS,
    )
    return sum_g, sum_sq
