"""Triton path_accumulate: acc[b, :] += sum_s w[s(, b)] * grads[s, b, :], in place.

One pass: each program owns one (row, F-block) tile of acc, loops over the S path
steps reading every gradient element exactly once, accumulates in fp32 registers and
does a single read-modify-write of acc. Memory traffic is grads + 2 * acc, the minimum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_same_device_and_dense, check_step_grads

BLOCK_F = 1024
NUM_WARPS = 4


@triton.jit
def _path_accumulate_kernel(acc_ptr, grads_ptr, w_ptr, S, plane, F, n_fblocks, w_stride_s, w_stride_b, BLOCK: tl.constexpr):
    # plane = B * F; pointers advance by it per step, so offsets never overflow int32
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_fblocks
    offs = (pid % n_fblocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    row_off = row * F + offs  # int64
    g_ptrs = grads_ptr + row_off
    w_ptrs = w_ptr + row * w_stride_b
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(S):
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        total += tl.load(w_ptrs) * g
        g_ptrs += plane
        w_ptrs += w_stride_s
    acc = tl.load(acc_ptr + row_off, mask=mask, other=0.0)
    tl.store(acc_ptr + row_off, acc + total, mask=mask)


def path_accumulate_triton(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """In place acc[b, :] += sum_s weights[s(, b)] * grads[s, b, :]; returns acc.

    acc (B, F) float32 contiguous; grads (S, B, F) float32/bfloat16/float16 contiguous;
    weights (S,) or (S, B), any float dtype (cast to float32 here).
    """
    name = "path_accumulate"
    if acc.dim() != 2:
        raise ValueError(f"{name}: acc must have shape (B, F); got {tuple(acc.shape)}")
    B, F = acc.shape
    if acc.dtype != torch.float32:
        raise TypeError(f"{name}: acc must be float32; got {acc.dtype}")
    S = check_step_grads(name, grads, weights, B, F, "acc")
    check_same_device_and_dense(name, ("acc", acc), {"grads": grads, "weights": weights}, {"acc": acc, "grads": grads})
    if B == 0 or F == 0 or S == 0:
        return acc
    w = weights.to(torch.float32).contiguous()
    w_stride_b = w.stride(1) if w.dim() == 2 else 0
    n_fblocks = triton.cdiv(F, BLOCK_F)
    _path_accumulate_kernel[(B * n_fblocks,)](
        acc, grads, w, S, B * F, F, n_fblocks, w.stride(0), w_stride_b, BLOCK=BLOCK_F, num_warps=NUM_WARPS
    )
    return acc
