"""The gradient engine: chunked, vectorized path-gradient passes under a row budget.

A pass integrates gradients of the selected model outputs along straight paths
x0 + alpha * (x - x0) for a set of (alpha, weight) points. Its work is the S x B
grid of (step, example) pairs, enumerated step-major; each chunk is a contiguous
run of at most ``max_rows`` pairs, so one forward never sees more rows than the
budget, whatever S and B are, and both steps and examples may be split.

Per chunk: build the interpolated rows on the device, one forward under the
precision policy, ONE autograd.grad with grad_outputs on the selected outputs,
then fastattr.kernels.path_accumulate folds the weighted gradients into an fp32
accumulator. A chunk covers at most three rectangles of the grid (a partial
step, whole steps, a partial step), each handed to the kernel as (s, b, F).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels
from .inputs import AttributionInputError, NoGradientError, check_target, flat_target_index
from .precision import Precision

logger = logging.getLogger(__name__)

DEFAULT_CPU_ROWS = 256  # CPU throughput peaks with cache-sized forwards, not memory-sized ones
DEFAULT_CUDA_BUDGET_FRACTION = 0.5  # of free device memory, when no memory_budget is given
CUDA_PROBE_ROWS = 16


def parse_bytes(value: int | str | None) -> int | None:
    """'4GiB', '512MB', '1e9' or an int -> bytes."""
    if value is None or isinstance(value, int):
        return value
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    if unit not in units:
        raise ValueError(f"cannot parse memory size {value!r}; use e.g. '8GiB', '512MB' or a number of bytes")
    return int(float(number) * units[unit])


@contextlib.contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """Turn off requires_grad on a module's parameters for the call (no weight gradients
    are needed, and autograd then saves fewer activations); restore them afterwards."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


@dataclass
class Problem:
    """A normalised attribution problem for one batch of B examples."""

    inputs: tuple[torch.Tensor, ...]  # each (B, *features)
    baselines: tuple[torch.Tensor, ...] | None  # each broadcast to its input's shape, or None (no path)
    target: torch.Tensor | None  # (B, k) int64 on the device, validated against the first output
    forward_args: tuple
    target_checked: bool = False

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device


class Engine:
    """Runs forward/gradient passes for one model under a precision policy and row budget."""

    def __init__(
        self,
        forward_func: Callable[..., torch.Tensor],
        precision: Precision,
        max_rows: int | None = None,
        memory_budget: int | str | None = None,
        kernel_backend: str | None = None,
    ) -> None:
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"internal_batch_size / max_rows must be a positive int, got {max_rows!r}")
        self.forward_func = forward_func
        self.precision = precision
        self.max_rows = max_rows
        self.memory_budget = parse_bytes(memory_budget)
        self.kernel_backend = kernel_backend
        self._rows_seen: int | None = None  # rows per forward found by the last CUDA probe

    # ----------------------------------------------------------------- budget
    def _rows_for(self, problem: Problem, total: int) -> tuple[int, bool]:
        """(rows per forward, whether to size it from a CUDA probe on the first chunk)."""
        cap = self.max_rows or total
        if problem.device.type != "cuda":
            return min(cap, self.max_rows or DEFAULT_CPU_ROWS, total), False
        return min(cap, total, CUDA_PROBE_ROWS), True

    def _rows_from_probe(self, probe_rows: int, peak_bytes: int, base_bytes: int, total: int, device: torch.device) -> int:
        per_row = max(1, (peak_bytes - base_bytes) // probe_rows)
        budget = self.memory_budget
        if budget is None:
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * DEFAULT_CUDA_BUDGET_FRACTION)
        rows = max(1, int(budget // per_row * 0.9))  # 10% headroom for allocator fragmentation
        rows = min(rows, self.max_rows or rows, total)
        logger.debug("row budget: %d bytes/row -> %d rows per forward", per_row, rows)
        return rows

    # ------------------------------------------------------------- selection
    def _select(self, output: torch.Tensor, example_idx: torch.Tensor, problem: Problem) -> torch.Tensor:
        """The selected output per row, (N,); validates the target on first use."""
        n_rows = example_idx.shape[0]
        if not isinstance(output, torch.Tensor):
            raise AttributionInputError(f"the model must return a tensor, got {type(output).__name__}")
        if output.dim() == 0 or output.shape[0] != n_rows:
            raise AttributionInputError(
                f"the model returned shape {tuple(output.shape)} for {n_rows} rows; its first dimension must be the batch"
            )
        if not problem.target_checked:
            problem.target = check_target(problem.target, output.shape)
            problem.target_checked = True
        if problem.target is None:
            return output.reshape(n_rows)
        flat = flat_target_index(problem.target.index_select(0, example_idx), output.shape)
        return output.reshape(n_rows, -1).gather(1, flat[:, None]).squeeze(1)

    @staticmethod
    def _rows_of_args(args: tuple, batch: int, example_idx: torch.Tensor) -> tuple:
        """Additional forward args for the chunk: batch-dim tensors are gathered per row."""
        return tuple(a.index_select(0, example_idx.to(a.device)) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a for a in args)

    # -------------------------------------------------------------- forward only
    def outputs(self, problem: Problem, rows_inputs: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """Selected fp32-policy outputs for several full batches of inputs (e.g. x and x0),
        evaluated together in forwards of at most the row budget. Returns one (B,) per batch."""
        batch = problem.batch
        stacked = [torch.cat([r[i] for r in rows_inputs]) for i in range(len(problem.inputs))]
        total = stacked[0].shape[0]
        default_rows = DEFAULT_CPU_ROWS if problem.device.type != "cuda" else max(512, self._rows_seen or 0)
        rows = min(self.max_rows or default_rows, total)
        out = torch.empty(total, dtype=torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32, device=problem.device)
        with torch.no_grad():
            for r0 in range(0, total, rows):
                r1 = min(total, r0 + rows)
                ex = torch.arange(r0, r1, device=problem.device) % batch
                y = self.forward_func(*(s[r0:r1] for s in stacked), *self._rows_of_args(problem.forward_args, batch, ex))
                out[r0:r1] = self._select(y, ex, problem).to(out.dtype)
        return list(out.split(batch))

    # -------------------------------------------------------------- gradients
    def integrate(
        self,
        problem: Problem,
        alphas: Sequence[float],
        weights: Sequence[float],
        endpoint_steps: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """sum_s w_s * dF/dx at x0 + alpha_s (x - x0), per input, as (B, F) accumulators.

        With problem.baselines None, every point is the input itself (alphas ignored
        except for their count): plain gradients. ``endpoint_steps`` maps a step index
        to a (B,) buffer that receives the selected outputs at that step (reuse of
        F(x) / F(x0) from the gradient pass when a rule includes an endpoint).
        """
        device, batch, n_steps = problem.device, problem.batch, len(alphas)
        acc_dtype = torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32
        flat_inputs = [x.reshape(batch, -1) for x in problem.inputs]
        accs = tuple(torch.zeros(x.shape, dtype=acc_dtype, device=device) for x in flat_inputs)
        alpha_t = torch.tensor(alphas, dtype=problem.inputs[0].dtype if problem.inputs[0].is_floating_point() else torch.float32, device=device)
        weight_t = torch.tensor(weights, dtype=acc_dtype, device=device)
        if problem.baselines is not None:
            starts = [b.reshape(batch, -1) for b in problem.baselines]
            diffs = [x - b for x, b in zip(flat_inputs, starts)]
        total = n_steps * batch
        rows, probe = self._rows_for(problem, total)
        p0 = 0
        while p0 < total:
            p1 = min(total, p0 + rows)
            segments = _segments(p0, p1, batch)
            if probe:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            # interpolated rows for this chunk, built on the device, one leaf per input
            leaves = []
            for i, x in enumerate(flat_inputs):
                if problem.baselines is None:
                    rows_i = torch.cat([x[e0:e1].unsqueeze(0).expand(s1 - s0, -1, -1).reshape(-1, x.shape[1]) for s0, s1, e0, e1 in segments])
                else:
                    rows_i = torch.cat(
                        [
                            torch.addcmul(starts[i][e0:e1].unsqueeze(0), alpha_t[s0:s1].view(-1, 1, 1), diffs[i][e0:e1].unsqueeze(0)).reshape(-1, x.shape[1])
                            for s0, s1, e0, e1 in segments
                        ]
                    )
                leaves.append(rows_i.view(p1 - p0, *problem.inputs[i].shape[1:]).detach().requires_grad_(True))
            example_idx = torch.arange(p0, p1, device=device) % batch
            grads, selected = self._grad_chunk(problem, leaves, example_idx)
            if probe:
                rows = self._rows_seen = self._rows_from_probe(p1 - p0, torch.cuda.max_memory_allocated(device), base, total, device)
                probe = False
            if endpoint_steps:
                for step, buf in endpoint_steps.items():
                    lo, hi = max(p0, step * batch), min(p1, (step + 1) * batch)
                    if lo < hi:
                        buf[lo - step * batch : hi - step * batch] = selected[lo - p0 : hi - p0].to(buf.dtype)
            for acc, g in zip(accs, grads):
                g = g.reshape(p1 - p0, -1)
                r = 0
                for s0, s1, e0, e1 in segments:
                    n = (s1 - s0) * (e1 - e0)
                    kernels.path_accumulate(acc[e0:e1], g[r : r + n].view(s1 - s0, e1 - e0, -1), weight_t[s0:s1], backend=self.kernel_backend)
                    r += n
            p0 = p1
        return accs

    def _grad_chunk(self, problem: Problem, leaves: list[torch.Tensor], example_idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        args = self._rows_of_args(problem.forward_args, problem.batch, example_idx)
        scale = self.precision.initial_scale
        for attempt in range(self.precision.max_retries + 1):
            with torch.enable_grad(), self.precision.context(problem.device):
                output = self.forward_func(*leaves, *args)
                selected = self._select(output, example_idx, problem)
            if not selected.requires_grad:
                raise NoGradientError("the selected model output does not require grad: it does not depend on any input (is the forward detached or under no_grad?)")
            seed = torch.full_like(selected, scale)
            grads = torch.autograd.grad(selected, leaves, grad_outputs=seed, allow_unused=True)
            missing = [i for i, g in enumerate(grads) if g is None]
            if missing:
                raise NoGradientError(f"the selected model output does not depend on input(s) {missing}: no gradient to attribute")
            if not self.precision.scaled:
                return grads, selected.detach()
            if all(bool(torch.isfinite(g).all()) for g in grads):
                return tuple(g / scale for g in grads), selected.detach()
            if not bool(torch.isfinite(selected).all()):
                raise FloatingPointError("the model's forward overflowed in fp16 (inf/NaN outputs); use precision='bf16' or 'fp32'")
            scale /= 2 ** (1 + attempt)  # back off faster on repeated overflow
            logger.debug("fp16 gradient overflow; retrying chunk with backward scale %g", scale)
        raise FloatingPointError("fp16 gradients stayed non-finite after lowering the backward scale; use precision='bf16' or 'fp32'")


def _segments(p0: int, p1: int, batch: int) -> list[tuple[int, int, int, int]]:
    """Split the step-major pair range [p0, p1) into (s0, s1, e0, e1) rectangles: at most
    a partial first step, a block of whole steps, and a partial last step."""
    out = []
    p = p0
    while p < p1:
        s, e = divmod(p, batch)
        if e != 0 or p1 - p < batch:
            e1 = min(batch, e + p1 - p)
            out.append((s, s + 1, e, e1))
            p += e1 - e
        else:
            k = (p1 - p) // batch
            out.append((s, s + k, 0, batch))
            p += k * batch
    return out
