"""Target log-probabilities from the LM head's input, with a backward sparse in the targets.

The token-mode pass runs one VJP per target through the same graph. Through the model's own
LM head, each of them pays for every kept position: log_softmax's backward, a zero-filled
(rows, positions, vocab) gradient and a (rows, positions, vocab) x (vocab, dim) matmul, of
which one position per row is non-zero. Measured on the benchmark's Llama (2 prompts, 32
points, 16 targets, one thread): that path was 17% of the CPU time (0.9 of 5.2 s).

So when the model's output embedding is a plain ``nn.Linear`` and the model's logits are
exactly that layer's output (checked on the capture pass: log-probabilities from the head's
captured input must equal the model's), the gradient passes skip the model's head (its
forward is swapped for one that records its input and returns a placeholder) and compute
``log p = z[y] - logsumexp(z)``, ``z = W h + b`` with ``HeadLogProb``, whose backward only
touches the targets whose seed is non-zero: W[y] - softmax(z) @ W per seeded (row, target).
Models whose logits are post-processed (soft-capping, scaling) fail the check and keep the
model's own head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}  # |lp_fast - lp_model| <= rtol * (1 + |lp|)


def head_linear(model: Any) -> torch.nn.Linear | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Linear) else None


class HeadLogProb(torch.autograd.Function):
    """(h (n, T, D), W (V, D), b (V) or None, y (n, T)) -> log softmax(W h + b)[y], (n, T).
    Computed in fp32 (fp64 for fp64 inputs) outside autocast."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dt)
            z = h.to(dt) @ w.T
            if bias is not None:
                z = z + bias.to(dt)
            lse = torch.logsumexp(z, -1)
            lp = z.gather(-1, y[..., None]).squeeze(-1) - lse
            z.sub_(lse[..., None]).exp_()  # in place: z becomes softmax, saved for the backward
        ctx.save_for_backward(z, w, y)
        ctx.h_dtype = h.dtype
        return lp

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        p, w, y = ctx.saved_tensors
        n, t, _ = p.shape
        gh = torch.zeros((n, t, w.shape[1]), dtype=p.dtype, device=p.device)
        cols = (g != 0).any(0).nonzero().reshape(-1)  # seeded targets: one per VJP in the loop
        if cols.numel():
            gc = g.index_select(1, cols).to(p.dtype)
            yc = y.index_select(1, cols)
            with torch.autocast(p.device.type, enabled=False):
                gh[:, cols] = gc[..., None] * (w[yc] - p.index_select(1, cols) @ w)
        return gh.to(ctx.h_dtype), None, None, None


@contextlib.contextmanager
def skipped_head(head: torch.nn.Linear, box: list[torch.Tensor]) -> Iterator[None]:
    """Within the block the head returns a (.., 1) placeholder and its input lands in ``box``."""

    def forward(h: torch.Tensor) -> torch.Tensor:
        box.append(h)
        return h.new_zeros((*h.shape[:-1], 1))

    head.forward = forward  # an instance attribute shadows the class's forward for this module only
    try:
        yield
    finally:
        del head.forward


@contextlib.contextmanager
def recorded_head(head: torch.nn.Linear, box: list[torch.Tensor]) -> Iterator[None]:
    """The head runs as usual; its input lands in ``box`` (the capture pass's check)."""
    handle = head.register_forward_pre_hook(lambda _m, args: box.append(args[0].detach()))
    try:
        yield
    finally:
        handle.remove()


def check(head: torch.nn.Linear, h: torch.Tensor, y: torch.Tensor, lp_model: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether log-probabilities from the head's input equal the model's (so the model's logits
    are the head's output, not post-processed)."""
    with torch.no_grad():
        lp = HeadLogProb.apply(h, head.weight, head.bias, y)
    err = (lp.to(lp_model.dtype) - lp_model).abs()[valid]
    tol = CHECK_RTOL.get(lp_model.dtype, 1e-4) * (1 + lp_model.abs()[valid])
    return bool((err <= tol).all())
