"""Forward-only capture of named layers' outputs (or inputs), batched under a row cap.

Used two ways:

- ``LayerActivation(model, layer)`` -- Captum-compatible (``attribute(inputs,
  additional_forward_args=None, attribute_to_layer_input=False)`` returns the layer's
  activation: a tensor (also for the input of a single-input layer), a tuple for a value
  with several tensors, a list for a list of layers);
- ``LayerActivation.attribute_batch(...) -> BatchResult`` -- what a dataset run with
  ``method="activations"`` stores (``attribute`` formats it). Its signature::

      attribute_batch(inputs, additional_forward_args=None, attribute_to_layer_input=False, *,
                      pool=None, channel_dim=1, lengths=None, **options) -> BatchResult

  ``options``: ``max_rows``, ``precision``, ``kernel_backend``, ``forward_kwargs`` (fastattr/options.py).

  ``attributions`` holds one tensor per captured part, named in ``names`` by the layer's
  qualified name (``name[j]`` for part j of a tuple-valued layer); ``stats`` are the
  per-sample stats of those tensors; ``output``, ``baseline_output``, ``delta`` and
  ``target`` are None and ``n_steps`` is 0 (no path, no gradients). With ``lengths``
  (B,) int, ``extras["lengths"]`` carries it, so padded token rows can be cut back.

Pooling (``pool`` = "mean", "max", "sum" or "l2") reduces each activation to one value
per channel (``channel_dim``: 1 for NCHW convolutions, -1 for (B, T, D) token models)
inside the hook, chunk by chunk, so a pooled run never holds the full activations.
With ``lengths``, dim 1 is the sequence and positions t >= length are left out of the pool.

The capture helper ``capture`` is shared with layer integrated gradients
(fastattr/layer_methods.py), which needs the same activations at x and at the baselines.
A layer that runs more than once in one forward is an error here, since one activation
per sample is ambiguous (Captum silently keeps the last call).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels
from .attribution import Attribution, BatchResult, combine_stats
from .engine import FORWARD_ONLY_ROWS, Engine, frozen_parameters
from .errors import OptionError
from .inputs import AttributionInputError, TensorOrTuple, as_tuple, check_inputs, normalize_forward_args
from .layers import resolve_layers
from .options import CAPTURE, OptionsDict, Unpack
from .precision import Precision

logger = logging.getLogger(__name__)

POOLS = ("mean", "max", "sum", "l2")


@dataclass
class LayerSlot:
    """One hooked layer and the structure of the value its hook sees (found on the first call)."""

    name: str
    module: torch.nn.Module
    bare: bool | None = None  # the value was a single tensor, not a tuple/list
    parts: list[int] = field(default_factory=list)  # positions of the floating-point tensors (captured / attributed)
    length: int = 0  # len of the tuple/list (1 when bare)

    def part_names(self) -> list[str]:
        if self.bare:
            return [self.name]
        return [f"{self.name}[{j}]" for j in self.parts]

    def record(self, value: Any, rows: int) -> list[torch.Tensor]:
        """Check ``value`` against (or record) the structure; return its captured tensors."""
        bare = isinstance(value, torch.Tensor)
        items = [value] if bare else list(value) if isinstance(value, (tuple, list)) else None
        if items is None:
            raise AttributionInputError(
                f"layer {self.name!r} produced a {type(value).__name__}; expected a tensor or a tuple/list of tensors"
            )
        parts = [j for j, v in enumerate(items) if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if self.bare is None:
            self.bare, self.parts, self.length = bare, parts, len(items)
        elif (bare, parts, len(items)) != (self.bare, self.parts, self.length):
            raise AttributionInputError(f"layer {self.name!r} changed the structure of its value between forwards")
        for j in parts:
            if items[j].dim() == 0 or items[j].shape[0] != rows:
                raise AttributionInputError(
                    f"layer {self.name!r}: part {j} of its value has shape {tuple(items[j].shape)}, without the batch of {rows} rows "
                    "as its first dimension; it cannot be split per sample"
                )
        return [items[j] for j in parts]


def make_slots(forward_func: Any, layer: Any) -> tuple[list[LayerSlot], bool]:
    """LayerSlots for a module / qualified name / list of those, and whether a list was given."""
    resolved, is_list = resolve_layers(forward_func, layer)
    return [LayerSlot(name, module) for name, module in resolved], is_list


def fresh_slots(slots: Sequence[LayerSlot]) -> list[LayerSlot]:
    """Copies without recorded structure, so concurrent calls do not share state."""
    return [LayerSlot(s.name, s.module) for s in slots]


def capture(
    forward_func: Callable[..., Any],
    slots: Sequence[LayerSlot],
    rows_inputs: tuple[torch.Tensor, ...],
    forward_args: tuple,
    batch: int,
    *,
    forward_kwargs: dict[str, Any] | None = None,
    max_rows: int | None,
    to_input: bool,
    precision: Precision,
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_output: Callable[[Any, torch.Tensor, int, int], None] | None = None,
) -> list[list[torch.Tensor]]:
    """Run the model forward-only over ``rows_inputs`` (N rows; row r is example r % batch
    for the per-example ``forward_args``) in chunks of at most ``max_rows`` rows, and return
    each slot's captured parts as (N, ...) tensors (after ``transform(part, example_idx)``).

    Each part is copied into a preallocated buffer inside the hook, so in-place ops later in
    the model cannot change it and no per-chunk list is concatenated. ``on_output(y, ex, r0, r1)``
    sees the model's output per chunk (F(x) for layer IG comes from the same forward).
    """
    total = rows_inputs[0].shape[0]
    rows = min(max_rows or FORWARD_ONLY_ROWS, total)
    device = rows_inputs[0].device
    buffers: list[list[torch.Tensor | None]] = [[] for _ in slots]
    state = {"r0": 0, "r1": 0, "ex": None}
    calls = [0] * len(slots)

    def make_hook(k: int) -> Callable[..., None]:
        slot = slots[k]

        def hook(_module: torch.nn.Module, args: Any, out: Any = None) -> None:
            calls[k] += 1
            if calls[k] > 1:
                raise AttributionInputError(
                    f"layer {slot.name!r} ran {calls[k]} times in one forward; capture and layer attribution need a layer "
                    "that runs once per forward (hook a module that is not reused)"
                )
            r0, r1 = state["r0"], state["r1"]
            parts = slot.record(args if to_input else out, r1 - r0)
            if not buffers[k]:
                buffers[k] = [None] * len(parts)
            for j, t in enumerate(parts):
                t = transform(t, state["ex"]) if transform is not None else t
                if buffers[k][j] is None:
                    buffers[k][j] = torch.empty((total, *t.shape[1:]), dtype=t.dtype, device=t.device)
                buffers[k][j][r0:r1].copy_(t)

        return hook

    with torch.no_grad(), precision.flags(), precision.autocast(device):
        for r0 in range(0, total, rows):
            r1 = min(total, r0 + rows)
            ex = torch.arange(r0, r1, device=device) % batch
            state.update(r0=r0, r1=r1, ex=ex)
            calls[:] = [0] * len(slots)
            handles = [
                s.module.register_forward_pre_hook(make_hook(k))
                if to_input
                else s.module.register_forward_hook(make_hook(k))
                for k, s in enumerate(slots)
            ]
            try:
                kwargs = Engine._rows_of_kwargs(forward_kwargs or {}, batch, ex)
                y = forward_func(*(x[r0:r1] for x in rows_inputs), *Engine._rows_of_args(forward_args, batch, ex), **kwargs)
            finally:
                for h in handles:
                    h.remove()
            missing = [s.name for s, c in zip(slots, calls) if c == 0]
            if missing:
                raise AttributionInputError(
                    f"layer(s) {missing} did not run during the model's forward; nothing to capture"
                )
            if on_output is not None:
                on_output(y, ex, r0, r1)
    return [[b for b in bufs if b is not None] for bufs in buffers]


def check_lengths(lengths: Any, batch: int, device: torch.device) -> torch.Tensor | None:
    """lengths -> (B,) int64 on the device, validated (no model work yet)."""
    if lengths is None:
        return None
    t = torch.as_tensor(lengths)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise AttributionInputError(f"lengths must hold integers, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise AttributionInputError(f"lengths must have shape ({batch},), one per example; got {tuple(t.shape)}")
    if bool((t < 0).any()):
        raise AttributionInputError(f"lengths must be >= 0, got {t.tolist()}")
    return t.to(device=device, dtype=torch.long)


def lengths_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask (1/True = real token) -> (B,) int64 number of real tokens."""
    if attention_mask.dim() != 2:
        raise AttributionInputError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    return (attention_mask != 0).sum(1).to(torch.long)


def pool_channels(
    t: torch.Tensor, mode: str, channel_dim: int, lengths: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """(N, ...) activation -> (N, C): one value per channel over all other non-batch dims.

    ``lengths`` (N,) masks dim 1 (the sequence) at positions >= length. Sums and L2 go
    through fastattr.kernels.channel_reduce (Triton on CUDA), accumulated in fp32.
    """
    if t.dim() < 3:
        raise AttributionInputError(
            f"pooling needs an activation with a channel and at least one position dim; got shape {tuple(t.shape)}"
        )
    cd = channel_dim % t.dim()
    if cd == 0:
        raise AttributionInputError("channel_dim cannot be the batch dimension (0)")
    if lengths is not None:
        if cd == 1:
            raise AttributionInputError(
                "with lengths, dim 1 is the sequence; channel_dim must be another dim (e.g. -1)"
            )
        keep = torch.arange(t.shape[1], device=t.device)[None, :] < lengths[:, None]  # (N, T)
        keep = keep.view(*keep.shape, *([1] * (t.dim() - 2)))
        count = (lengths.clamp(min=1) * (t[0].numel() // (t.shape[1] * t.shape[cd]))).to(torch.float32)
    else:
        count = torch.full((t.shape[0],), t[0].numel() / t.shape[cd], device=t.device)
    if mode == "max":
        if lengths is not None:
            t = t.masked_fill(~keep, float("-inf"))
        return t.movedim(cd, 1).flatten(2).amax(2)
    if lengths is not None:
        t = t * keep
    flat = t.movedim(cd, 1).reshape(t.shape[0], t.shape[cd], -1).contiguous()
    out_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    red = kernels.channel_reduce(flat, 2, "l2" if mode == "l2" else "sum", out_dtype=out_dtype, backend=backend)
    return red / count[:, None].to(red.dtype) if mode == "mean" else red


def check_layer_method(forward_func: Callable[..., Any], device_ids: list[int] | None) -> None:
    """The constructor checks shared by the layer methods: a callable model, no DataParallel device_ids."""
    if not callable(forward_func):
        raise TypeError(f"forward_func must be a model or callable, got {type(forward_func).__name__}")
    if device_ids:
        raise OptionError("device_ids (DataParallel) is not supported; run one process per device (torchrun) instead")


def layer_slots(forward_func: Callable[..., Any], layer: Any, device_ids: list[int] | None) -> tuple[list[LayerSlot], bool]:
    """check_layer_method, then the layers' slots and whether a list of layers was given."""
    check_layer_method(forward_func, device_ids)
    return make_slots(forward_func, layer)


def per_layer_structure(parts_per_layer: list[int], is_list: bool) -> Callable[[list[torch.Tensor]], Any]:
    """Captum's nesting of layer results: per layer a tensor, or a tuple when its value has several
    tensors; a list of those when a list of layers was given."""

    def arrange(attrs: list[torch.Tensor]) -> Any:
        per_layer: list[Any] = []
        i = 0
        for n in parts_per_layer:
            per_layer.append(attrs[i] if n == 1 else tuple(attrs[i : i + n]))
            i += n
        return per_layer if is_list else per_layer[0]

    return arrange


class LayerActivation(Attribution):
    """Activations of one or several layers (Captum's LayerActivation), batched under a row cap."""

    option_names = CAPTURE
    noise_batched = False  # no target, no gradient: NoiseTunnel runs Captum's generic path over it
    rows_like_captum = True  # up to FORWARD_ONLY_ROWS rows in one forward: train-mode BatchNorm gives Captum's values
    _multiply_by_inputs = True  # Captum's value

    def __init__(self, forward_func: Callable[..., Any], layer: Any, device_ids: list[int] | None = None) -> None:
        self.slots, self.is_list = layer_slots(forward_func, layer, device_ids)
        super().__init__(forward_func)

    def attribute_batch(
        self,
        inputs: TensorOrTuple,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        *,
        pool: str | None = None,
        channel_dim: int = 1,
        lengths: Any = None,
        **options: Unpack[OptionsDict],
    ) -> BatchResult:
        """Activations (pooled per channel if ``pool``) with per-sample stats, as a BatchResult
        for dataset runs; see the module docstring for the fields. ``attribute`` returns the
        activations as Captum does (bf16 activations come back as float32)."""
        # everything is validated before the first forward
        opts = self._options(options)
        if pool is not None and pool not in POOLS:
            raise OptionError(f"pool must be None or one of {POOLS}, got {pool!r}")
        xs, _ = as_tuple(inputs)
        batch = check_inputs(xs, need_float=False, allow_nonfinite=True)
        lens = check_lengths(lengths, batch, xs[0].device)
        if lens is not None and pool is None:
            logger.debug("lengths given without pool: stored as a field, activations are kept whole")
        fargs = normalize_forward_args(additional_forward_args)
        transform = None
        if pool is not None:

            def transform(t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
                return pool_channels(t, pool, channel_dim, None if lens is None else lens[ex], backend=opts.kernel_backend)

        slots = fresh_slots(self.slots)
        with frozen_parameters(self.forward_func):
            parts = capture(
                self.forward_func, slots, tuple(x.detach() for x in xs), fargs, batch, forward_kwargs=opts.kwargs,
                max_rows=opts.max_rows, to_input=attribute_to_layer_input, precision=opts.policy, transform=transform,
            )  # fmt: skip
        empty = [s.name for s in slots if not s.parts]
        if empty:
            raise AttributionInputError(f"layer(s) {empty} produced no floating-point tensor to capture")
        attrs, stats = [], []
        for a in (t for p in parts for t in p):
            # bf16 has no HDF5 type: store float32 (float16 and float64 keep theirs)
            out_dtype = torch.float32 if a.dtype == torch.bfloat16 else a.dtype
            flat = a.reshape(batch, -1)
            acc = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            stored, st = kernels.finalize(acc, None, None, out_dtype=out_dtype, backend=opts.kernel_backend)
            attrs.append(stored.view(a.shape))
            stats.append(st)
        extras = {} if lens is None else {"lengths": lens}
        names = [n for s in slots for n in s.part_names()]
        return BatchResult(
            attrs, len(attrs) > 1, combine_stats(stats), None, None, None, 0, None, names=names, extras=extras,
            structure=per_layer_structure([len(s.parts) for s in slots], self.is_list),
        )  # fmt: skip
