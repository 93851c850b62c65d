"""The shared-forward engine: one forward per path point serves every generated token.

With teacher forcing and causal attention, the log-probability of target t depends only on
the prompt and the targets before it, so one forward over prompt + continuation gives all T
log-probabilities of a path point (Captum runs one forward per target). Their T gradients
are T vector-Jacobian products through the same graph:

- ``vjp="loop"`` (default): T ``autograd.grad`` calls on a retained graph;
- ``vjp="batched"``: ``autograd.grad(..., is_grads_batched=True)`` (vmap over the seeds),
  in groups so that rows x targets stays within the row cap.

Measured on the 2-core CPU (random-init GPT-2 and Llama, 4 layers, width 256, 49-token prompt,
16 targets, 32 points, one thread, CPU seconds): loop 5.2 s vs batched 8.6 s (GPT-2); Llama
3.9 s vs 11.1 s. The batched backward moves T times larger tensors through every layer and
loses to cache misses; the loop keeps each backward at the forward's size. Forward mode
(one JVP per prompt token gives all T at once) lost even with a prompt shorter than the
continuation (9 prompt tokens, 16 targets: 1.87 s loop of VJPs, 2.97 s loop of JVPs, 1.93 s
vmapped JVPs), so it is not offered.

``token=False`` (the seq_attr-only mode): the gradient of sum_t log p_t, one backward per point.

Work is the list of (example, path point) pairs, example-major over examples sorted by
length; a chunk is at most ``max_rows`` pairs (the row cap, or the RowPlanner's size),
cut to the columns its own rows need. Each forward and each backward sees at most that
many rows (``vjp="batched"``: rows x targets per backward). Accumulators are fp32 (fp64
for a float64 model); forward and backward run under the precision policy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..budget import RowPlanner, identity
from ..errors import AttributionInputError, NoGradientError
from ..precision import Precision
from . import head
from .batching import Layout
from .head import HeadLogProb
from .model import CausalLM

logger = logging.getLogger(__name__)

VJP_MODES = ("loop", "batched")
CAPTURE_ROWS = 32  # rows per forward-only capture forward when no cap is given


def acc_dtype_of(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _picked(t: torch.Tensor, lay: Layout, rows: torch.Tensor, c1: int, n_targets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, n_targets, X) rows of ``t`` (n, K', X), whose last position is column c1 - 1, at the
    positions that predict each target; also the target ids and validity (n, n_targets)."""
    cols = lay.target_cols().index_select(0, rows)[:, :n_targets]
    valid = lay.t_valid.index_select(0, rows)[:, :n_targets]
    k = t.shape[1]
    if bool((cols[valid] < c1 - k).any()):
        raise AttributionInputError(f"the model returned logits for {k} positions; more are needed for the targets")
    kidx = (cols - (c1 - k)).clamp(0, k - 1)
    picked = t.gather(1, kidx[:, :, None].expand(-1, -1, t.shape[2]))
    return picked, lay.targets.index_select(0, rows)[:, :n_targets], valid


def target_logprobs(
    out: torch.Tensor, lay: Layout, rows: torch.Tensor, c1: int, n_targets: int, dtype: torch.dtype, head: torch.nn.Linear | None = None
) -> torch.Tensor:
    """(n, n_targets) log p(y_t | prefix) of the examples ``rows``, 0 past each one's T_i.
    ``out``: logits (n, K', V), or with ``head`` the head's input (n, K', D)."""
    picked, tgt, valid = _picked(out, lay, rows, c1, n_targets)
    if head is None:
        lp = torch.log_softmax(picked.to(dtype), -1).gather(2, tgt[:, :, None]).squeeze(2)
    else:
        lp = HeadLogProb.apply(picked, head.weight, head.bias, tgt).to(dtype)
    return torch.where(valid, lp, torch.zeros_like(lp))


def _keep(lay: Layout, rows: torch.Tensor, c1: int) -> int:
    """How many last positions of [.., c1) hold the logits of every target of ``rows``."""
    first = lay.offset.index_select(0, rows) + lay.prompt_len.index_select(0, rows) - 1
    return c1 - int(first.min())


def capture(
    lm: CausalLM, lay: Layout, max_rows: int | None, with_baseline: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """a(x), a(x0) (B, S, D), the target log-probs F(x), F(x0) (B, Tmax), and whether the LM
    head's input gives the model's log-probs (head.py): forward only, x and x0 stacked, in
    forwards of at most ``max_rows`` rows. Without the baseline, a(x0) and F(x0) are zeros."""
    b = lay.batch
    ids = torch.cat([lay.ids, lay.base_ids]) if with_baseline else lay.ids
    n = ids.shape[0]
    both = torch.arange(n, device=ids.device) % b
    rows = min(max_rows or CAPTURE_ROWS, n)
    acts, fs = [], []
    tmax = lay.targets.shape[1]
    padded = bool((lay.mask == 0).any())
    fast = lm.head is not None
    with torch.no_grad():
        for r0 in range(0, n, rows):
            ex = both[r0 : r0 + rows]
            mask = lay.mask.index_select(0, ex) if padded else None
            pos = lay.positions.index_select(0, ex) if padded else None
            a, logits, h = lm.capture(ids[r0 : r0 + rows], mask, pos, _keep(lay, ex, lay.width))
            if a.shape[:2] != ids[r0 : r0 + rows].shape:
                raise AttributionInputError(f"the attributed layer's output {tuple(a.shape)} is not (rows, positions, dim)")
            acts.append(a)
            f = target_logprobs(logits, lay, ex, lay.width, tmax, acc_dtype_of(a))
            fs.append(f)
            if fast and h is not None:
                picked, tgt, valid = _picked(h, lay, ex, lay.width, tmax)
                fast = head.check(lm.head, picked, tgt, f, valid)
            fast = fast and h is not None
    a_all, f_all = torch.cat(acts), torch.cat(fs)
    logger.debug("sparse-target LM head: %s", "used" if fast else "not used (the model's logits are not its head's output)")
    if not with_baseline:
        return a_all, torch.zeros_like(a_all), f_all, torch.zeros_like(f_all), fast
    return a_all[:b], a_all[b:], f_all[:b], f_all[b:], fast


def integrate(
    lm: CausalLM,
    lay: Layout,
    a: torch.Tensor,
    a0: torch.Tensor,
    mult: torch.Tensor | None,
    alphas: Sequence[float],
    weights: Sequence[float],
    *,
    token: bool,
    precision: Precision,
    max_rows: int | None = None,
    memory_budget: int | str | None = None,
    vjp: str = "loop",
    fast_head: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """sum_s w_s * sum_d mult * d log p_t / d e at e = a0 + alpha_s (a - a0), per column.

    Returns (acc_tok (B, Tmax, S) or None, acc_seq (B, S)): the per-target accumulators (token
    mode; acc_seq is then their sum over targets) or only the sum's (seq mode). ``mult`` (B, S, D)
    multiplies the gradient before the sum over the embedding dim (None: the plain gradient)."""
    if vjp not in VJP_MODES:
        raise AttributionInputError(f"vjp must be one of {VJP_MODES}, got {vjp!r}")
    fast_head = fast_head and not (token and vjp == "batched")  # its sparse backward picks columns: no vmap
    device, b, width, tmax = a.device, lay.batch, lay.width, lay.targets.shape[1]
    acc_dtype = acc_dtype_of(a)
    n_pts = len(alphas)
    order = torch.argsort(lay.seq_len, descending=True, stable=True)
    pair_ex = order.repeat_interleave(n_pts)
    pair_al = torch.tensor(alphas, dtype=a.dtype, device=device).repeat(b)
    pair_w = torch.tensor(weights, dtype=acc_dtype, device=device).repeat(b)
    diff = a - a0
    acc_tok = torch.zeros((b, tmax, width), dtype=acc_dtype, device=device) if token else None
    acc_seq = torch.zeros((b, width), dtype=acc_dtype, device=device)
    total = pair_ex.shape[0]
    key = (identity(lm.model), precision.name, "llm-token" if token else "llm-seq", vjp, width, a.shape[2], a.dtype)
    planner = RowPlanner(device, total, max_rows, memory_budget, row_bytes=width * a.shape[2] * a.element_size(), key=key)
    p0 = 0
    while p0 < total:
        p1 = min(total, p0 + planner.rows)
        planner.begin()
        rows = pair_ex[p0:p1]
        c0, c1 = lay.span(rows)
        with planner.watch():  # on the CPU: what autograd saves per row bounds the rows by the host memory budget
            contrib = _chunk(lm, lay, rows, c0, c1, a0, diff, mult, pair_al[p0:p1], token, precision, vjp, max_rows, acc_dtype, fast_head)
        contrib *= pair_w[p0:p1].view(-1, 1, 1)
        if token:
            acc_tok[:, : contrib.shape[1], c0:c1].index_add_(0, rows, contrib)
        else:
            acc_seq[:, c0:c1].index_add_(0, rows, contrib[:, 0])
        planner.end(p1 - p0)
        p0 = p1
    if token:
        acc_seq = acc_tok.sum(1)
    return acc_tok, acc_seq


def _chunk(
    lm: CausalLM,
    lay: Layout,
    rows: torch.Tensor,
    c0: int,
    c1: int,
    a0: torch.Tensor,
    diff: torch.Tensor,
    mult: torch.Tensor | None,
    alphas: torch.Tensor,
    token: bool,
    precision: Precision,
    vjp: str,
    max_rows: int | None,
    acc_dtype: torch.dtype,
    fast_head: bool,
) -> torch.Tensor:
    """(n, Tc, c1 - c0) per-target contributions of one chunk (Tc = 1 in seq mode), unweighted."""
    n = rows.shape[0]
    n_t = int(lay.target_len.index_select(0, rows).max())
    ids = lay.ids.index_select(0, rows)[:, c0:c1]
    padded = lay.padded(rows, c0, c1)
    mask = lay.mask.index_select(0, rows)[:, c0:c1] if padded else None
    pos = lay.positions.index_select(0, rows)[:, c0:c1] if padded else None
    m = None if mult is None else mult.index_select(0, rows)[:, c0:c1].to(acc_dtype)
    base = torch.addcmul(a0.index_select(0, rows)[:, c0:c1], alphas.view(-1, 1, 1), diff.index_select(0, rows)[:, c0:c1])
    valid = lay.t_valid.index_select(0, rows)[:, :n_t]
    scale = precision.initial_scale
    for attempt in range(precision.max_retries + 1):
        e = base.detach().requires_grad_(True)
        with torch.enable_grad(), precision.flags(), precision.autocast(e.device):
            keep = _keep(lay, rows, c1)
            if fast_head:
                lp = target_logprobs(lm.hidden(e, ids, mask, pos, keep), lay, rows, c1, n_t, acc_dtype, lm.head)
            else:
                lp = target_logprobs(lm.logits(e, ids, mask, pos, keep), lay, rows, c1, n_t, acc_dtype)
        if not lp.requires_grad:
            raise NoGradientError("the target log-probabilities do not depend on the attributed layer (is it the model's input embedding?)")
        seeds = valid.to(lp.dtype) * scale

        def reduce(g: torch.Tensor) -> torch.Tensor:  # (..., n, Sc, D) -> (..., n, Sc): sum over the embedding dim
            g = g.to(acc_dtype)
            return (g * m).sum(-1) if m is not None else g.sum(-1)

        with precision.flags():
            out = torch.stack(_vjps(lp, e, seeds, token, vjp, n, max_rows, reduce), 1)
        if not precision.scaled:
            return out
        if bool(torch.isfinite(out).all()):
            return out / scale
        scale /= 2 ** (1 + attempt)
        logger.debug("fp16 gradient overflow; retrying chunk with backward scale %g", scale)
    raise FloatingPointError("fp16 gradients stayed non-finite after lowering the backward scale; use precision='bf16' or 'fp32'")


def _vjps(
    lp: torch.Tensor, e: torch.Tensor, seeds: torch.Tensor, token: bool, vjp: str, n: int, max_rows: int | None, reduce: Callable
) -> list[torch.Tensor]:
    """Reduced gradients w.r.t. e: one of sum_t (seq mode), else one per target (Tc of them)."""
    if not token:
        return [reduce(torch.autograd.grad(lp, e, seeds)[0])]
    n_t = lp.shape[1]
    out = []
    if vjp == "loop":
        for t in range(n_t):
            seed = torch.zeros_like(seeds)
            seed[:, t] = seeds[:, t]
            out.append(reduce(torch.autograd.grad(lp, e, seed, retain_graph=t < n_t - 1)[0]))
        return out
    group = n_t if max_rows is None else max(1, max_rows // n)
    eye = torch.eye(n_t, dtype=seeds.dtype, device=seeds.device)
    for t0 in range(0, n_t, group):
        t1 = min(n_t, t0 + group)
        batched = eye[t0:t1, None, :] * seeds[None]  # (G, n, Tc): seed g selects target t0 + g
        (g,) = torch.autograd.grad(lp, e, batched, retain_graph=t1 < n_t, is_grads_batched=True)
        out.extend(reduce(g).unbind(0))
    return out
