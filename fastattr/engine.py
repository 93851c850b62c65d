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
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels
from .budget import RowPlanner, identity, parse_bytes
from .errors import FastattrError, OptionError
from .inputs import AttributionInputError, NoGradientError, check_target, flat_target_index
from .layers import module_of
from .options import OutputSelector, optional_positive_int, select_output
from .precision import Precision

logger = logging.getLogger(__name__)

FORWARD_ONLY_ROWS = 256  # rows per no-grad forward (F(x), F(x0)) when no cap is given

_frozen_lock = threading.Lock()
_frozen_count: dict[int, tuple[int, bool]] = {}  # id(param) -> (active calls, flag to restore)


@contextlib.contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """Turn off requires_grad on a module's parameters for the call (no weight gradients
    are needed, and autograd then saves fewer activations); restore them afterwards.
    Reference-counted, so overlapping calls from several threads restore the user's flags."""
    module = module_of(model)
    params = list(module.parameters()) if module is not None else []
    with _frozen_lock:
        for p in params:
            count, flag = _frozen_count.get(id(p), (0, p.requires_grad))
            _frozen_count[id(p)] = (count + 1, flag)
            p.requires_grad_(False)
    try:
        yield
    finally:
        with _frozen_lock:
            for p in params:
                count, flag = _frozen_count.pop(id(p))
                if count > 1:
                    _frozen_count[id(p)] = (count - 1, flag)
                else:
                    p.requires_grad_(flag)


class Layout:
    """How one input's rows are laid out while the engine works on them.

    Image batches (4-D) may run channels-last: on a 2-core CPU a 32x32 CNN's forward and
    backward ran 1.7x faster (fp32) and 1.75x faster (bf16) on channels-last inputs.
    The engine builds rows directly in that order, accumulates gradients in it (so
    the gradient needs no copy), and returns attributions in the user's layout.
    Whether a model gets channels-last rows is settled by ``Engine.settle_layout``.
    """

    def __init__(self, shape: torch.Size, channels_last: bool) -> None:
        self.shape = tuple(shape[1:])  # one example
        self.channels_last = channels_last and len(shape) == 4

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """(N, *shape) -> (N, F) in the working order (a view when already in that order)."""
        if self.channels_last:
            t = t.permute(0, 2, 3, 1)
        return t.reshape(t.shape[0], -1)

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, F) in working order -> (N, *shape) view for the model (channels-last strides)."""
        if self.channels_last:
            c, h, w = self.shape
            return flat.view(-1, h, w, c).permute(0, 3, 1, 2)
        return flat.view(-1, *self.shape)

    def user(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, F) in working order -> contiguous (N, *shape) in the user's layout."""
        return self.rows(flat).contiguous()


def use_channels_last(requested: bool | None, device: torch.device, precision: Precision, forward: Any = None) -> bool:
    """Whether image inputs should run channels-last: as requested, else by measurement (see
    benchmarks/RESULTS.md): on CPU when the model has convolution modules; on CUDA under bf16/fp16
    autocast, whose tensor-core convolutions want NHWC, but not in fp32. Engine.settle_layout
    checks the model takes it.

    On CPU only convolutions gain from the layout (the demo CNN ran 1.7x faster); a model without
    them pays for it: its first reshape/flatten copies every row back and the gradient comes back
    in NCHW order (a saliency run through a near-free model spent 18% of its time in such copies).
    ``forward`` (the model, or a bound method of one) is searched for ``nn.Conv*`` modules
    (``_ConvNd``: Conv1d/2d/3d and their transposed and lazy forms); convolutions called through
    ``torch.nn.functional`` or a plain function are not seen, and such a model runs in the inputs'
    own layout, which is correct, only maybe slower. ``forward=None``: the model is not known
    (benchmarks that ask for the old rule)."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        return precision.autocast_dtype is not None
    return forward is None or has_convolutions(forward)


def has_convolutions(forward: Any) -> bool:
    """Whether ``forward`` is (or is a bound method of) a module holding a convolution module."""
    module = module_of(forward)
    return module is not None and any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in module.modules())


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def is_compiled(forward: Any) -> bool:
    """Whether ``forward`` runs through torch.compile: an OptimizedModule, a compiled function, a module
    after ``module.compile()``, or a bound method of one. Such a model is recompiled for every new
    input shape or stride layout, so the engine gives it one layout and one row count (``Engine``)."""
    owner = getattr(forward, "__self__", None)
    for f in (forward, owner):
        if f is None:
            continue
        if type(f).__name__ == "OptimizedModule" or hasattr(f, "_torchdynamo_orig_callable"):
            return True
        if isinstance(f, torch.nn.Module) and getattr(f, "_compiled_call_impl", None) is not None:
            return True
    return False


def _mixes_rows(m: torch.nn.Module) -> bool:
    """Whether ``m`` computes across the rows of a forward: any module in train mode, and BatchNorm
    without running stats (track_running_stats=False), which uses batch statistics in eval mode too."""
    return m.training or (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is None)


def _padded(t: torch.Tensor, pad: int) -> torch.Tensor:
    """``t`` with ``pad`` copies of its first row appended (real values: nothing non-finite is
    introduced), in ``t``'s memory format."""
    if pad <= 0:
        return t
    out = torch.cat([t, t[:1].expand(pad, *t.shape[1:])])
    if _is_channels_last(t):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# compile=True: one compiled forward per callable, so engines built per call share its cache
_compiled: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
COMPILE_BACKEND: Any = "inductor"  # torch.compile's backend for compile=True (tests count frames with another)


def compiled_forward(forward: Any) -> Any:
    """torch.compile(forward, dynamic=False), made once per callable (compile=True). Not the whole
    chunk step: autograd.grad inside a compiled region breaks the graph, so the forward is compiled
    (its backward is AOT-compiled with it) and the engine keeps its shapes fixed (RowPlanner fixed)."""
    try:
        with _layout_lock:
            if forward not in _compiled:
                _compiled[forward] = torch.compile(forward, dynamic=False, backend=COMPILE_BACKEND)
            return _compiled[forward]
    except TypeError:  # not weak-referenceable or not hashable
        return torch.compile(forward, dynamic=False, backend=COMPILE_BACKEND)


# Models known to run (True) or to fail (False) on channels-last rows, so each is tried once per
# process. Keyed weakly by the forward callable; an unhashable callable is tried on every call.
_layout_verdicts: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_layout_lock = threading.Lock()
GRAD_KWARGS = ("materialize_grads",)  # torch.autograd.grad keywords a caller may set (Captum's grad_kwargs)


def _verdict(forward: Any) -> bool | None:
    try:
        with _layout_lock:
            return _layout_verdicts.get(forward)
    except TypeError:  # not weak-referenceable or not hashable
        return None


def _remember(forward: Any, works: bool) -> None:
    try:
        with _layout_lock:
            _layout_verdicts[forward] = works
    except TypeError:
        pass


@dataclass
class Problem:
    """A normalised attribution problem for one batch of B examples."""

    inputs: tuple[torch.Tensor, ...]  # each (B, *features)
    baselines: tuple[torch.Tensor, ...] | None  # each broadcast to its input's shape, or None (no path)
    target: torch.Tensor | None  # (B, k) int64 on the device, validated against the first output
    forward_args: tuple
    target_checked: bool = False
    channels_last: bool = False  # image inputs run channels-last (see Layout, Engine.settle_layout)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword args of the forward, rows like forward_args
    layout_open: bool = False  # the layout may still fall back (Engine.settle_layout / _pass)
    layout_error: Exception | None = None  # why it fell back
    predict: Any = None  # a TargetFromOutput (fastattr/inputs.py): the target comes from the passes' forwards on x itself

    _flat: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (target, its version, out dims, flat index)

    def __post_init__(self) -> None:
        self.set_channels_last(self.channels_last)

    def flat_target(self, output_shape: torch.Size) -> torch.Tensor:
        """(B,) flat index of every example's (validated) target into output.reshape(N, -1), computed
        once per pass instead of per chunk; recomputed when the target is replaced or changed in place
        (a predicted target fills in as the passes see the inputs). Holds the target, so ``is`` is safe."""
        t, dims = self.target, tuple(output_shape[1:])
        if t.is_inference():  # no version counter to tell an in-place change: not cached
            return flat_target_index(t, output_shape)
        c = self._flat
        if c is None or c[0] is not t or c[1] != t._version or c[2] != dims:
            c = self._flat = (t, t._version, dims, flat_target_index(t, output_shape))
        return c[3]

    def set_channels_last(self, flag: bool) -> None:
        """Set the working layout; only before any pass has used the problem."""
        self.channels_last = flag
        self.layouts = [Layout(x.shape, flag) for x in self.inputs]

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
        output: OutputSelector = None,
        grad_kwargs: dict[str, Any] | None = None,
        compile: bool = False,  # noqa: A002 - the option's name
    ) -> None:
        if not isinstance(compile, bool):
            raise OptionError(f"compile must be True or False, got {compile!r}")
        self.forward_func = compiled_forward(forward_func) if compile and not is_compiled(forward_func) else forward_func
        # a compiled model recompiles per input shape and stride layout: one row count for every chunk
        # (RowPlanner fixed=True) and, where rows are independent (no module in train mode and no
        # BatchNorm without running stats: both normalise over the chunk), short chunks padded up to it
        # with copies of a row whose results are dropped
        self.fixed_rows = is_compiled(self.forward_func)
        module = module_of(self.forward_func)
        self.pad_rows = self.fixed_rows and module is not None and not any(_mixes_rows(m) for m in module.modules())
        self.precision = precision
        self.max_rows = optional_positive_int("max_rows", max_rows)
        self.memory_budget = parse_bytes(memory_budget)  # fail fast on a malformed size
        self.kernel_backend = kernel_backend
        self.output = output  # which tensor of the model's output (fastattr.options.select_output)
        unknown = sorted(set(grad_kwargs or {}) - set(GRAD_KWARGS))
        if unknown:
            raise OptionError(f"grad_kwargs supports {', '.join(GRAD_KWARGS)}; got {', '.join(unknown)}")
        self.materialize_grads = bool((grad_kwargs or {}).get("materialize_grads", False))

    # ------------------------------------------------------------- layout
    def settle_layout(self, problem: Problem, requested: bool | None) -> Problem:
        """Set the problem's starting layout before any pass uses it; returns the problem.

        ``requested`` True / False is obeyed. None (the default) means channels-last where it is
        faster (``use_channels_last``: on CPU only for a model with convolution modules) unless this
        model is known to fail on it. Channels-last is a
        speed choice and must never break a model (``x.view(B, -1)`` after a convolution fails on
        channels-last strides), so with None the layout stays open until the first gradient chunk
        ran: if that chunk fails, the pass restarts in the inputs' own layout (``_pass``); the
        model's failure is remembered for the process (later calls start in the inputs' layout), and a
        fallback is logged once per model; a model that ran channels-last may still fall back on
        other input shapes.
        Channels-last results differ from the inputs' layout's by float rounding and by the ReLU /
        max-pool decisions a last-bit difference can flip (README, benchmarks/RESULTS.md)."""
        if requested is not None or not any(x.dim() == 4 for x in problem.inputs):
            problem.set_channels_last(bool(requested))
        elif self.fixed_rows:  # compiled: the inputs' own layout, so strides never flip between passes
            problem.set_channels_last(all(_is_channels_last(x) for x in problem.inputs if x.dim() == 4))
        elif not use_channels_last(None, problem.device, self.precision, self.forward_func):
            problem.set_channels_last(False)
        else:
            verdict = _verdict(self.forward_func)
            problem.set_channels_last(verdict is not False)
            # open also after a success: other input shapes may fail where the first ones ran (a
            # 1x1 feature map views fine channels-last, a 2x2 one does not)
            problem.layout_open = verdict is not False
        return problem

    def _pass(self, problem: Problem, run: Callable[[], Any]) -> Any:
        """Run a pass; if its first chunk fails on channels-last rows while the layout is still open
        (settle_layout), rerun it in the inputs' own layout. Nothing layout-dependent has been
        accumulated then: a pass writes its results only after a chunk's gradients come back."""
        try:
            return run()
        except (FastattrError, torch.OutOfMemoryError):  # bad input or memory: not a layout question
            raise
        except Exception as e:
            if not (problem.layout_open and problem.channels_last):
                raise
            problem.set_channels_last(False)
            problem.layout_error = e
        return run()

    def _layout_ran(self, problem: Problem) -> None:
        """A gradient chunk succeeded: the layout is settled for this problem and remembered for the model."""
        if not problem.layout_open:
            return
        problem.layout_open = False
        _remember(self.forward_func, problem.channels_last)
        e = problem.layout_error
        if e is not None:
            logger.info(
                "%s fails on channels-last inputs (%s: %s); it runs in the inputs' own layout from now on",
                type(self.forward_func).__name__, type(e).__name__, (str(e).splitlines() or [""])[0][:200],
            )  # fmt: skip

    # ------------------------------------------------------------- rows per chunk
    def _planner(self, device: torch.device, total: int, row_bytes: int, key: tuple) -> RowPlanner:
        return RowPlanner(device, total, self.max_rows, self.memory_budget, row_bytes=row_bytes, key=key, fixed=self.fixed_rows)

    def _pad(self, rows: int, n: int) -> int:
        """Rows to append to a chunk of ``n`` so a compiled model sees one shape (0 unless pad_rows)."""
        return rows - n if self.pad_rows and n < rows else 0

    def _forward_rows(self, problem: Problem, total: int | None) -> int:
        """Rows per no-grad forward: the cap (else FORWARD_ONLY_ROWS), at most ``total``; for a compiled
        model one fixed size, never clamped to the pass (short passes are padded): on CUDA the same
        cap, as uncompiled models get (the CUDA planner's 16-row probe never settled for these
        passes, so compiled models ran them 16 rows at a time); on CPU the planner's fixed size."""
        if not self.fixed_rows:
            rows = self.max_rows or FORWARD_ONLY_ROWS
            return rows if total is None else min(rows, total)
        if problem.device.type == "cuda":
            return self.max_rows or FORWARD_ONLY_ROWS
        row_bytes = sum(x[0].numel() * x.element_size() for x in problem.inputs)
        key = ("forward-only", identity(self.forward_func), self.precision.name, tuple((x.shape[1:], x.dtype) for x in problem.inputs))
        return self._planner(problem.device, 1, row_bytes, key).rows  # per model and row shape, as the gradient passes

    def _forward(self, problem: Problem, rows: Sequence[torch.Tensor], example_idx: torch.Tensor, seq: tuple[int, int] | None = None) -> Any:
        """The model on ``rows`` (the chunk's inputs) with its per-row forward args and kwargs."""
        args = self._rows_of_args(problem.forward_args, problem.batch, example_idx, seq)
        kwargs = self._rows_of_kwargs(problem.forward_kwargs, problem.batch, example_idx, seq)
        return self.forward_func(*rows, *args, **kwargs)

    # ------------------------------------------------------------- selection
    def _select(self, output: torch.Tensor, example_idx: torch.Tensor, problem: Problem, fresh: int = 0) -> torch.Tensor:
        """The selected output per row, (N,); validates the target on first use. The first ``fresh``
        rows are the inputs themselves, seen for the first time: with ``problem.predict`` their
        targets are taken from this output before it is selected."""
        n_rows = example_idx.shape[0]
        output = select_output(output, self.output)
        if output.dim() == 0 or output.shape[0] != n_rows:
            raise AttributionInputError(
                f"the model returned shape {tuple(output.shape)} for {n_rows} rows; its first dimension must be the batch"
            )
        if fresh and problem.predict is not None:
            t = problem.predict.resolve(output[:fresh].detach(), example_idx[:fresh])
            if t is not None:  # None: one output per example, nothing to pick
                if problem.target is None:  # zeros (a valid index) until every row is resolved
                    problem.target = torch.zeros((problem.batch, t.shape[1]), dtype=torch.long, device=t.device)
                problem.target[example_idx[:fresh]] = t
        if not problem.target_checked:
            problem.target = check_target(problem.target, output.shape)
            problem.target_checked = True
        if problem.target is None:
            return output.reshape(n_rows)
        flat = problem.flat_target(output.shape).index_select(0, example_idx)
        return output.reshape(n_rows, -1).gather(1, flat[:, None]).squeeze(1)

    @staticmethod
    def _row_of(a: Any, batch: int, example_idx: torch.Tensor, seq: tuple[int, int] | None) -> Any:
        """One forward arg for the chunk: a batch-dim tensor gathered per row, else as given.
        ``seq`` = (T, L): a gathered arg whose dim 1 has the inputs' length T is cut to L."""
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch:
            if seq is not None and a.dim() > 1 and a.shape[1] == seq[0]:
                a = a[:, : seq[1]]  # cut before gathering: fewer bytes copied
            a = a.index_select(0, example_idx.to(a.device))
        return a

    @classmethod
    def _rows_of_args(cls, args: tuple, batch: int, example_idx: torch.Tensor, seq: tuple[int, int] | None = None) -> tuple:
        """Additional forward args for the chunk (see _row_of)."""
        return tuple(cls._row_of(a, batch, example_idx, seq) for a in args)

    @classmethod
    def _rows_of_kwargs(cls, kwargs: dict[str, Any], batch: int, example_idx: torch.Tensor, seq: tuple[int, int] | None = None) -> dict[str, Any]:
        """Keyword forward args for the chunk (see _row_of)."""
        return {k: cls._row_of(v, batch, example_idx, seq) for k, v in kwargs.items()}

    @staticmethod
    def _seq_plan(problem: Problem, seq_lengths: torch.Tensor | None) -> tuple[int, list[int]] | None:
        """(T, per-position columns of each flat input) for a sequence-trimmed pass, validated."""
        if seq_lengths is None:
            return None
        t = problem.inputs[0].shape[1] if problem.inputs[0].dim() > 1 else -1
        bad = [tuple(x.shape) for x in problem.inputs if x.dim() < 2 or x.shape[1] != t]
        if bad or any(lay.channels_last for lay in problem.layouts):
            raise ValueError(
                "seq_lengths needs every input laid out as (B, T, ...) with the same T in dim 1 and no channels-last layout; "
                f"got shapes {[tuple(x.shape) for x in problem.inputs]}"
            )
        if seq_lengths.shape != (problem.batch,) or bool((seq_lengths > t).any()):
            raise ValueError(f"seq_lengths must be ({problem.batch},) values <= {t}, got shape {tuple(seq_lengths.shape)} max {int(seq_lengths.max())}")
        return t, [x[0, 0].numel() for x in problem.inputs]

    @staticmethod
    def _chunk_len(seq_lengths: torch.Tensor, ex: torch.Tensor) -> int:
        """Positions a chunk keeps: its longest real length (at least one, so no tensor is empty)."""
        return max(1, int(seq_lengths.index_select(0, ex).max()))

    # -------------------------------------------------------------- forward only
    def outputs(self, problem: Problem, rows_inputs: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """Selected fp32-policy outputs for several full batches of inputs (e.g. x and x0),
        evaluated together in forwards of at most the row budget. Returns one (B,) per batch."""
        batch = problem.batch
        stacked = [torch.cat([r[i] for r in rows_inputs]) for i in range(len(problem.inputs))]
        total = stacked[0].shape[0]
        rows = self._forward_rows(problem, total)
        out = torch.empty(total, dtype=torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32, device=problem.device)
        with torch.no_grad(), self.precision.flags():
            for r0 in range(0, total, rows):
                r1 = min(total, r0 + rows)
                pad = self._pad(rows, r1 - r0)
                ex = _padded(torch.arange(r0, r1, device=problem.device) % batch, pad)
                y = self._forward(problem, [_padded(s[r0:r1], pad) for s in stacked], ex)
                fresh = max(0, min(r1, batch) - r0) if rows_inputs[0] is problem.inputs else 0  # rows of x itself
                out[r0:r1] = self._select(y, ex, problem, fresh)[: r1 - r0].to(out.dtype)
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
        return self._pass(problem, lambda: self._integrate(problem, alphas, weights, endpoint_steps))

    def _integrate(
        self,
        problem: Problem,
        alphas: Sequence[float],
        weights: Sequence[float],
        endpoint_steps: dict[int, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, ...]:
        device, batch, n_steps = problem.device, problem.batch, len(alphas)
        acc_dtype = torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32
        flat_inputs = [lay.flat(x) for lay, x in zip(problem.layouts, problem.inputs)]
        accs = tuple(torch.zeros(x.shape, dtype=acc_dtype, device=device) for x in flat_inputs)
        # interpolation coefficients in each input's own dtype, so mixed-dtype inputs keep theirs
        alpha_ts = [torch.tensor(alphas, dtype=x.dtype if x.is_floating_point() else torch.float32, device=device) for x in problem.inputs]
        weight_t = torch.tensor(weights, dtype=acc_dtype, device=device)
        if problem.baselines is not None:
            starts = [lay.flat(b) for lay, b in zip(problem.layouts, problem.baselines)]
            diffs = [x - b for x, b in zip(flat_inputs, starts)]
        total = n_steps * batch
        row_bytes = sum(x.shape[1] * x.element_size() for x in flat_inputs)
        key = (identity(self.forward_func), self.precision.name, tuple((x.shape[1:], x.dtype) for x in problem.inputs))
        planner = self._planner(device, total, row_bytes, key)
        # per-pass constants, so a chunk costs as few small ops as possible (on a 2-core CPU a chunk of
        # the demo CNN takes a few ms; every extra op and Python call there is time outside the model)
        examples = torch.arange(batch, device=device)
        torch_kernels = kernels.resolve_backend(self.kernel_backend, accs[0]) == "torch"
        step_weights = list(zip(weight_t.unbind(), weight_t.tolist()))  # (0-dim tensor, value) per step
        p0 = 0
        while p0 < total:
            p1 = min(total, p0 + planner.rows)
            segments = _segments(p0, p1, batch)
            one_step = len(segments) == 1 and segments[0][1] - segments[0][0] == 1
            n, pad = p1 - p0, self._pad(planner.rows, p1 - p0)
            planner.begin()
            # interpolated rows for this chunk, built on the device, one leaf per input
            leaves = []
            for i, x in enumerate(flat_inputs):
                if problem.baselines is None and one_step:
                    rows_i = x[segments[0][2] : segments[0][3]]  # the inputs themselves: a view, no copy (the leaf is detached)
                elif problem.baselines is None:
                    rows_i = _joined([x[e0:e1].unsqueeze(0).expand(s1 - s0, -1, -1).reshape(-1, x.shape[1]) for s0, s1, e0, e1 in segments])
                else:
                    rows_i = _joined(
                        [
                            torch.addcmul(starts[i][e0:e1].unsqueeze(0), alpha_ts[i][s0:s1].view(-1, 1, 1), diffs[i][e0:e1].unsqueeze(0)).reshape(-1, x.shape[1])
                            for s0, s1, e0, e1 in segments
                        ]
                    )
                leaves.append(problem.layouts[i].rows(_padded(rows_i, pad)).detach().requires_grad_(True))
            ex = examples[segments[0][2] : segments[0][3]] if one_step else torch.arange(p0, p1, device=device) % batch
            example_idx = _padded(ex, pad)
            fresh = max(0, min(p1, batch) - p0) if problem.baselines is None else 0  # step 0 of plain gradients: x itself
            with planner.watch():
                grads, selected = self._grad_chunk(problem, leaves, example_idx, fresh=fresh)
            if pad:  # the padded rows' results are dropped (rows are independent: Engine.pad_rows)
                grads, selected = tuple(g[:n] for g in grads), selected[:n]
            if endpoint_steps:
                for step, buf in endpoint_steps.items():
                    lo, hi = max(p0, step * batch), min(p1, (step + 1) * batch)
                    if lo < hi:
                        buf[lo - step * batch : hi - step * batch] = selected[lo - p0 : hi - p0].to(buf.dtype)
            for acc, g, lay in zip(accs, grads, problem.layouts):
                g = lay.flat(g).contiguous()  # the kernels take dense rows
                r = 0
                for s0, s1, e0, e1 in segments:
                    g_seg = g[r : r + (s1 - s0) * (e1 - e0)]
                    if s1 - s0 == 1 and torch_kernels and g.dtype == acc.dtype:
                        # one step (every chunk smaller than the batch): acc += w * g, the values
                        # path_accumulate's einsum gives (one product, one sum), without its dispatch
                        w, value = step_weights[s0]
                        acc[e0:e1].add_(g_seg if value == 1.0 else torch.mul(g_seg, w))
                    else:
                        kernels.path_accumulate(acc[e0:e1], g_seg.view(s1 - s0, e1 - e0, -1), weight_t[s0:s1], backend=self.kernel_backend)
                    r += (s1 - s0) * (e1 - e0)
            planner.end(n + pad)
            p0 = p1
        return accs

    def _path_parts(self, problem: Problem) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.dtype]:
        """Flat baselines and x - x0 per input in the working layout, and the accumulator dtype."""
        if problem.baselines is None:
            raise ValueError("a pass over (example, alpha) pairs needs a path: the problem has no baselines")
        starts = [lay.flat(b) for lay, b in zip(problem.layouts, problem.baselines)]
        diffs = [lay.flat(x) - s for lay, x, s in zip(problem.layouts, problem.inputs, starts)]
        return starts, diffs, torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32

    @staticmethod
    def _check_pairs(problem: Problem, example_idx: torch.Tensor, alphas: torch.Tensor) -> None:
        if example_idx.dim() != 1 or alphas.shape != example_idx.shape:
            raise ValueError(f"example_idx and alphas must be matching 1-D tensors, got {tuple(example_idx.shape)} and {tuple(alphas.shape)}")
        if example_idx.numel() and (int(example_idx.min()) < 0 or int(example_idx.max()) >= problem.batch):
            raise ValueError(f"example_idx must lie in [0, {problem.batch}), got [{int(example_idx.min())}, {int(example_idx.max())}]")

    def integrate_pairs(
        self,
        problem: Problem,
        example_idx: torch.Tensor,
        alphas: torch.Tensor,
        weights: torch.Tensor,
        accs: Sequence[torch.Tensor],
        dest: torch.Tensor | None = None,
        *,
        seq_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A gradient pass over an arbitrary list of P (example, alpha, weight) pairs.

        Pair p is the point x0[e] + alpha_p (x[e] - x0[e]) with e = example_idx[p]; its
        weighted gradient w_p * dF/dx is added into row dest[p] (default e) of each input's
        flat accumulator in ``accs`` (working layout, like integrate's). Pairs are cut into
        chunks of at most the row budget whatever examples they belong to, so samples at
        different refinement levels share forwards. Returns, per pair, the selected output
        F (under the policy; free from the forward) and the directional derivative
        dF/dalpha = sum over inputs of g . (x - x0), both in the accumulator dtype.

        ``seq_lengths`` (B,): padding-aware pass for token inputs laid out (B, T, ...). Each
        chunk runs with dim 1 of its inputs (and of the batch-dim forward args of length T
        in dim 1) cut to the chunk's longest length L; gradients fill positions [0, L) of the
        accumulators and nothing is added past L. Exact only for a model whose output ignores
        positions past each row's length (the caller checks that); order the pairs so a chunk
        holds rows of similar length.
        """
        return self._pass(problem, lambda: self._integrate_pairs(problem, example_idx, alphas, weights, accs, dest, seq_lengths))

    def _integrate_pairs(
        self,
        problem: Problem,
        example_idx: torch.Tensor,
        alphas: torch.Tensor,
        weights: torch.Tensor,
        accs: Sequence[torch.Tensor],
        dest: torch.Tensor | None,
        seq_lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_pairs(problem, example_idx, alphas)
        seq = self._seq_plan(problem, seq_lengths)
        device, total = problem.device, example_idx.shape[0]
        starts, diffs, acc_dtype = self._path_parts(problem)
        example_idx = example_idx.to(device=device, dtype=torch.long)
        dest = example_idx if dest is None else dest.to(device=device, dtype=torch.long)
        weights = weights.to(device=device, dtype=acc_dtype)
        alpha_ts = [alphas.to(device=device, dtype=x.dtype) for x in problem.inputs]
        outs = torch.zeros(total, dtype=acc_dtype, device=device)
        dots = torch.zeros(total, dtype=acc_dtype, device=device)
        row_bytes = sum(d.shape[1] * d.element_size() for d in diffs)
        key = (identity(self.forward_func), self.precision.name, tuple((x.shape[1:], x.dtype) for x in problem.inputs))
        if seq is not None:  # trimmed rows cost less than full ones: tune them apart
            key = (*key, "seq-trimmed")
        planner = self._planner(device, max(total, 1), row_bytes, key)
        p0 = 0
        while p0 < total:
            p1 = min(total, p0 + planner.rows)
            m, pad = p1 - p0, 0 if seq is not None else self._pad(planner.rows, p1 - p0)  # trimmed chunks vary anyway
            planner.begin()
            ex = example_idx[p0:p1]
            points, chunk_diffs, cut, cols = self._pair_points(problem, starts, diffs, alpha_ts, ex, p0, p1, seq, seq_lengths, pad)
            leaves = [p.detach().requires_grad_(True) for p in points]
            with planner.watch():
                grads, selected = self._grad_chunk(problem, leaves, _padded(ex, pad), None if seq is None else (seq[0], cut))
            if pad:  # the padded rows' results are dropped
                grads, selected = tuple(g[:m] for g in grads), selected[:m]
            outs[p0:p1] = selected.to(acc_dtype)
            for acc, g, lay, d, n in zip(accs, grads, problem.layouts, chunk_diffs, cols):
                g = g.reshape(g.shape[0], -1).to(acc_dtype) if cut is not None else lay.flat(g).to(acc_dtype)
                dots[p0:p1] += (g * d.to(acc_dtype)).sum(1)
                acc[:, :n].index_add_(0, dest[p0:p1], g * weights[p0:p1, None])  # a view: positions >= L get nothing
            planner.end(m + pad)
            p0 = p1
        return outs, dots

    def outputs_pairs(
        self, problem: Problem, example_idx: torch.Tensor, alphas: torch.Tensor, *, seq_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Selected outputs (forward only, under this engine's policy) at P (example, alpha)
        path points, in forwards of at most the row budget; (P,) in the accumulator dtype.
        ``seq_lengths``: each chunk cut to its longest length, as in integrate_pairs."""
        return self._pass(problem, lambda: self._outputs_pairs(problem, example_idx, alphas, seq_lengths))

    def _outputs_pairs(self, problem: Problem, example_idx: torch.Tensor, alphas: torch.Tensor, seq_lengths: torch.Tensor | None) -> torch.Tensor:
        self._check_pairs(problem, example_idx, alphas)
        seq = self._seq_plan(problem, seq_lengths)
        device, total = problem.device, example_idx.shape[0]
        starts, diffs, acc_dtype = self._path_parts(problem)
        example_idx = example_idx.to(device=device, dtype=torch.long)
        alpha_ts = [alphas.to(device=device, dtype=x.dtype) for x in problem.inputs]
        out = torch.zeros(total, dtype=acc_dtype, device=device)
        rows = self._forward_rows(problem, None)
        with torch.no_grad(), self.precision.flags(), self.precision.autocast(device):
            for p0 in range(0, total, rows):
                p1 = min(total, p0 + rows)
                pad = 0 if seq is not None else self._pad(rows, p1 - p0)
                ex = example_idx[p0:p1]
                xs, _, cut, _ = self._pair_points(problem, starts, diffs, alpha_ts, ex, p0, p1, seq, seq_lengths, pad)
                y = self._forward(problem, xs, _padded(ex, pad), None if seq is None else (seq[0], cut))
                out[p0:p1] = self._select(y, _padded(ex, pad), problem)[: p1 - p0].to(acc_dtype)
        return out

    def finalize(self, problem: Problem, accs: Sequence[torch.Tensor], multiply_by_inputs: bool) -> tuple[list[torch.Tensor], list[kernels.Stats]]:
        """Attributions in the user's layout and dtype, and per-example stats, per input:
        acc * (x - x0) when multiply_by_inputs (x0 = zeros without baselines), else acc."""
        attrs, stats = [], []
        for i, (acc, x, lay) in enumerate(zip(accs, problem.inputs, problem.layouts)):
            xf = x0f = None
            if multiply_by_inputs:
                xf = lay.flat(x).contiguous()
                x0f = None if problem.baselines is None else lay.flat(problem.baselines[i]).contiguous()
            # lay.user copies channels-last rows into the user's layout anyway: no copy of acc before it
            attr, st = kernels.finalize(acc, xf, x0f, out_dtype=x.dtype, backend=self.kernel_backend, copy=not lay.channels_last)
            attrs.append(lay.user(attr))
            stats.append(st)
        return attrs, stats

    def _pair_points(
        self,
        problem: Problem,
        starts: list[torch.Tensor],
        diffs: list[torch.Tensor],
        alpha_ts: list[torch.Tensor],
        ex: torch.Tensor,
        p0: int,
        p1: int,
        seq: tuple[int, list[int]] | None,
        seq_lengths: torch.Tensor | None,
        pad: int = 0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int | None, list[int]]:
        """Path points x0 + alpha (x - x0) of pairs [p0, p1) (examples ``ex``) in the model's view,
        per input, plus ``pad`` copies of the first pair's point; also each pair's x - x0 (unpadded),
        the trimmed length (None: full) and the flat columns kept."""
        cut = None if seq is None else self._chunk_len(seq_lengths, ex)
        cols = [d.shape[1] if cut is None else cut * c for d, c in zip(diffs, seq[1] if seq else diffs)]
        chunk_diffs = [d[:, :n].index_select(0, ex) for d, n in zip(diffs, cols)]
        ex_p = _padded(ex, pad)
        points = [
            self._rows(lay, torch.addcmul(s[:, :n].index_select(0, ex_p), _padded(a[p0:p1], pad).view(-1, 1), _padded(d, pad)), cut)
            for lay, s, d, a, n in zip(problem.layouts, starts, chunk_diffs, alpha_ts, cols)
        ]
        return points, chunk_diffs, cut, cols

    @staticmethod
    def _rows(lay: Layout, flat: torch.Tensor, cut: int | None) -> torch.Tensor:
        """Flat rows -> the model's view: the full layout, or (N, cut, ...) for a trimmed chunk."""
        return lay.rows(flat) if cut is None else flat.view(flat.shape[0], cut, *lay.shape[1:])

    def _grad_chunk(
        self, problem: Problem, leaves: list[torch.Tensor], example_idx: torch.Tensor, seq: tuple[int, int] | None = None, fresh: int = 0
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        scale = self.precision.initial_scale
        for attempt in range(self.precision.max_retries + 1):
            with self.precision.flags():  # forward and backward: the backward's matmuls/convs follow the policy too
                with torch.enable_grad(), self.precision.autocast(problem.device):
                    output = self._forward(problem, leaves, example_idx, seq)
                    selected = self._select(output, example_idx, problem, fresh)
                if not selected.requires_grad:
                    if self.materialize_grads:  # Captum's grad_kwargs={"materialize_grads": True}: zeros
                        return tuple(torch.zeros_like(leaf) for leaf in leaves), selected.detach()
                    raise NoGradientError("the selected model output does not require grad: it does not depend on any input (is the forward detached or under no_grad?)")
                seed = torch.full_like(selected, scale)
                grads = torch.autograd.grad(selected, leaves, grad_outputs=seed, allow_unused=True, materialize_grads=self.materialize_grads)
            missing = [i for i, g in enumerate(grads) if g is None]
            if missing:
                raise NoGradientError(f"the selected model output does not depend on input(s) {missing}: no gradient to attribute")
            self._layout_ran(problem)
            if not self.precision.scaled:
                return grads, selected.detach()
            if all(bool(torch.isfinite(g).all()) for g in grads):
                return tuple(g / scale for g in grads), selected.detach()
            if not bool(torch.isfinite(selected).all()):
                raise FloatingPointError("the model's forward overflowed in fp16 (inf/NaN outputs); use precision='bf16' or 'fp32'")
            scale /= 2 ** (1 + attempt)  # back off faster on repeated overflow
            logger.debug("fp16 gradient overflow; retrying chunk with backward scale %g", scale)
        raise FloatingPointError("fp16 gradients stayed non-finite after lowering the backward scale; use precision='bf16' or 'fp32'")


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of fresh row blocks, without the copy when there is one block."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
