"""What each batch of a dataset run gives the engine, and errors that name the sample.

``Targets`` resolves a run's target per batch (a fixed int or tuple, the labels, the model's
prediction, a per-sample array); ``Baselines`` slices per-sample baselines. ``name_samples``
turns an input error of one batch into one naming the global sample index (non-finite values,
a target out of range), and ``nonfinite_counts`` counts the non-finite values of each sample's
results (attributions, F(x), F(x0), delta) that the runner stores in ``stats/nonfinite``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import AttributionInputError, NonFiniteError, OptionError, SourceError
from .inputs import TargetFromOutput
from .options import OutputSelector, select_output
from .run_methods import Batch, describe
from .sources import Source

ALLOW_HINT = "pass allow_nonfinite=True (fastattr run --allow-nonfinite) to store such samples, counted in stats/nonfinite"
SHOWN = 10  # indices listed in a message


def samples(index: np.ndarray | list[int]) -> str:
    """'sample 7' or 'samples 7, 9, 12 (and 3 more)': global indices for a message."""
    index = [int(i) for i in index]
    shown = ", ".join(map(str, index[:SHOWN]))
    more = f" (and {len(index) - SHOWN} more)" if len(index) > SHOWN else ""
    return f"sample{'s' if len(index) > 1 else ''} {shown}{more}"


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: rows holding a NaN or inf."""
    if x.is_floating_point() and bool(torch.isfinite(x.sum())):  # one pass, no mask: NaN/inf make the sum non-finite
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)


class Targets:
    """Per-batch targets from a fixed int or tuple, the labels, the prediction, or an array."""

    def __init__(self, spec: Any, source: Source, total: int, allow_nonfinite: bool = False, output: OutputSelector = None) -> None:
        if isinstance(spec, str) and spec.endswith(".npy"):
            from .sources import load_npy

            spec = load_npy(spec)
        self.spec = spec
        self.allow_nonfinite = allow_nonfinite
        self.output = output  # which tensor of the model's output the prediction is taken from
        self._last: PredictedTarget | None = None  # last batch's target="predicted"
        self.array = None
        if isinstance(spec, str):
            if spec not in ("label", "predicted"):
                raise OptionError(f"target must be an int, a tuple of ints, 'label', 'predicted', a per-sample array or a .npy path; got {spec!r}")
            if spec == "label" and not source.has_labels:
                raise SourceError("target='label' but the data has no labels")
        elif spec is None or isinstance(spec, int) or (isinstance(spec, tuple) and all(isinstance(v, int) for v in spec)):
            pass  # the same target for every sample, as in attribute()
        else:
            arr = spec.detach().cpu() if isinstance(spec, torch.Tensor) else torch.as_tensor(np.asarray(spec))
            if arr.is_floating_point() or arr.is_complex() or arr.dtype == torch.bool:
                raise OptionError(f"a per-sample target array must hold integers, got dtype {arr.dtype}")
            if arr.dim() not in (1, 2) or arr.shape[0] != total:
                raise OptionError(f"the per-sample target array has shape {tuple(arr.shape)}; expected ({total},) or ({total}, k) for {total} samples")
            self.array = arr.long()

    @property
    def nonfinite_rows(self) -> np.ndarray | None:
        """Last batch, target="predicted": (B,) bool, rows whose output held NaN/inf (None: none did).
        With a fused target it is complete once the batch's attribution call returned."""
        return None if self._last is None else self._last.nonfinite_rows

    def for_batch(
        self, start: int, stop: int, labels: torch.Tensor | None, model: Any, inputs: tuple, device: torch.device, n_attributed: int,
        forward_kwargs: dict[str, Any] | None = None, fused: bool = False,
    ) -> Any:
        """The batch's target. fused=True (methods that run the model on the inputs themselves in
        fp32 anyway, run_methods.MethodPlan.fuses_predicted): target="predicted" comes back as a
        PredictedTarget that the engine resolves from that forward; otherwise from a forward here."""
        self._last = None
        if self.array is not None:
            return self.array[start:stop].to(device)
        if isinstance(self.spec, str) and self.spec == "label":
            if bool((labels < 0).any()):  # e.g. -1 for "unlabelled": never wrap it to the last class
                bad = start + int((labels < 0).nonzero()[0, 0])
                raise SourceError(f"sample {bad} has label {int(labels[bad - start])}; target='label' needs class indices >= 0")
            return labels.to(device)
        if isinstance(self.spec, str) and self.spec == "predicted":
            self._last = PredictedTarget(self, start, stop - start, model, inputs, n_attributed, forward_kwargs or {})
            return self._last if fused else self._last.full()
        return self.spec


class PredictedTarget(TargetFromOutput):
    """target="predicted" for one batch: the argmax of the ``output=``-selected model output, never
    over NaN. Resolved from the method's own forward (``resolve``, per chunk of rows) or from a
    no-grad forward of the batch (``full``); both give the same targets, the same errors and the
    same ``nonfinite_rows``."""

    def __init__(self, targets: Targets, start: int, rows: int, model: Any, inputs: tuple, n_attributed: int, forward_kwargs: dict[str, Any]) -> None:
        self.targets, self.start, self.rows, self.model = targets, start, rows, model
        self.inputs, self.n_attributed, self.forward_kwargs = inputs, n_attributed, forward_kwargs
        self.nonfinite_rows: np.ndarray | None = None  # (rows,) bool once a resolved row held NaN/inf

    def full(self) -> torch.Tensor | None:
        with torch.no_grad():
            out = select_output(self.model(*self.inputs, **self.forward_kwargs), self.targets.output)  # the tensor the method attributes
        t = self._pick(out, torch.arange(out.shape[0], device=out.device), whole=True)
        return t[:, 0] if t is not None and out.dim() == 2 else t  # (B,) for one output dim, as before

    def resolve(self, out: torch.Tensor, example_idx: torch.Tensor) -> torch.Tensor | None:
        return self._pick(out, example_idx, whole=False)

    def _pick(self, out: torch.Tensor, example_idx: torch.Tensor, whole: bool) -> torch.Tensor | None:
        per_sample = out.shape[1:]
        if math.prod(per_sample) == 1:
            return None  # a single output per sample: nothing to pick
        flat_out = out.reshape(out.shape[0], -1)
        bad = _bad_rows(flat_out)
        if bool(bad.any()):  # argmax of NaN is NaN's position (class 0 when all are NaN): never a silent pick
            rows = example_idx[bad].cpu().numpy()
            if not self.targets.allow_nonfinite:
                if not whole:
                    self.full()  # the error names every such sample of the batch, as a forward of the batch does
                self._refuse(rows)
            if self.nonfinite_rows is None:
                self.nonfinite_rows = np.zeros(self.rows, dtype=bool)
            self.nonfinite_rows[rows] = True  # counted in stats/nonfinite when the batch is written
            flat_out = torch.where(torch.isnan(flat_out), torch.full_like(flat_out, -math.inf), flat_out)
        flat = flat_out.argmax(1)
        if len(per_sample) == 1:
            return flat[:, None]
        return torch.stack(torch.unravel_index(flat, tuple(per_sample)), dim=1)  # (N, k) indices

    def _refuse(self, rows: np.ndarray) -> None:
        """Raise for rows whose output held NaN/inf: naming the inputs that hold NaN/inf, else the outputs."""
        for i, x in enumerate(self.inputs[: self.n_attributed]):
            if x.is_floating_point() and bool(_bad_rows(x[rows]).any()):
                culprits = rows[_bad_rows(x[rows]).cpu().numpy()]
                raise AttributionInputError(f"{samples(self.start + culprits)}: input {i} contains NaN or inf values; {ALLOW_HINT}")
        raise NonFiniteError(
            f"{samples(self.start + rows)}: the model's output is NaN or inf, so target='predicted' has no class to pick; "
            f"fix the model or data, or {ALLOW_HINT} (their target is then the largest non-NaN output)"
        )


class Baselines:
    """Baselines for a dataset run, resolved once: a per-sample array (one row per sample,
    like the data) stays where it is and is sliced per batch; anything else (None, a number,
    one sample's array) is moved to the device once and applies to every sample."""

    def __init__(self, baselines: Any, total: int, shapes: tuple[tuple[int, ...], ...], device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype, self.total = device, dtype, total
        self.tuple = isinstance(baselines, tuple)
        parts = baselines if self.tuple else (baselines,)
        self.parts = [self._resolve(b, shape) for b, shape in zip(parts, shapes)]

    def _resolve(self, b: Any, shape: tuple[int, ...]) -> tuple[bool, Any]:
        if isinstance(b, (np.ndarray, torch.Tensor)) and b.ndim == len(shape) + 1 and b.shape[0] == self.total and tuple(b.shape[1:]) == shape:
            return True, b  # per sample: sliced per batch
        if isinstance(b, np.ndarray):
            b = torch.from_numpy(np.array(b))
        return False, b.to(self.device, self.dtype) if isinstance(b, torch.Tensor) else b

    def for_batch(self, start: int, stop: int) -> Any:
        out = []
        for per_sample, b in self.parts:
            if per_sample:
                rows = b[start:stop]
                rows = torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows
                b = rows.to(self.device, self.dtype)
            out.append(b)
        return tuple(out) if self.tuple else out[0]


class ForwardKwargs:
    """A run's ``forward_kwargs``: an array or tensor with one row per sample (an attention mask
    for the whole dataset) is sliced per batch like the data; anything else is moved to the
    device once (tensors) or passed as given, for every batch."""

    def __init__(self, kwargs: dict[str, Any] | None, total: int, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.per_sample: dict[str, Any] = {}
        self.fixed: dict[str, Any] = {}
        for k, v in (kwargs or {}).items():
            if isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim >= 1 and v.shape[0] == total:
                self.per_sample[k] = v
            else:
                self.fixed[k] = self._move(torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v)

    def _move(self, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)

    def for_batch(self, start: int, stop: int) -> dict[str, Any]:
        rows = {k: v[start:stop] for k, v in self.per_sample.items()}
        return {**self.fixed, **{k: self._move(torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v) for k, v in rows.items()}}

    @staticmethod
    def describe(kwargs: dict[str, Any]) -> dict[str, Any]:
        """For the run's manifest: arrays by shape, dtype and hash, plain values as they are, lists,
        tuples and string-keyed dicts item by item (a changed setting inside one is seen), other
        objects by their type (their values cannot be compared across processes)."""
        return {k: _describe_kwarg(v) for k, v in kwargs.items()}


def _describe_kwarg(v: Any) -> Any:
    if v is None or isinstance(v, (int, float, str, np.ndarray, torch.Tensor)):
        return describe(v)
    if isinstance(v, (list, tuple)):
        return [_describe_kwarg(e) for e in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _describe_kwarg(e) for k, e in v.items()}
    return {"object": f"{type(v).__module__}.{type(v).__qualname__}"}


def describe_output(selector: OutputSelector) -> Any:
    """output= for the run's manifest: a key or index as given, a callable by its qualified name."""
    if callable(selector):
        module, name = getattr(selector, "__module__", None), getattr(selector, "__qualname__", None) or type(selector).__qualname__
        return {"callable": f"{module}.{name}" if module else name}
    return int(selector) if isinstance(selector, (int, np.integer)) else selector


def name_samples(exc: AttributionInputError, batch: Batch, model: Any, output: OutputSelector = None) -> AttributionInputError | None:
    """The batch's input error restated for the samples that cause it, by global index, or None
    when it is not about particular samples. Runs only after an error, so it costs nothing else."""
    rows = batch.stop - batch.start
    for i, x in enumerate(batch.inputs):
        if x.is_floating_point() and bool((bad := _bad_rows(x)).any()):
            return type(exc)(f"{samples(batch.start + bad.nonzero()[:, 0].cpu().numpy())}: input {i} contains NaN or inf values; {ALLOW_HINT}")
    parts = batch.baselines if isinstance(batch.baselines, tuple) else (batch.baselines,)
    for i, (b, x) in enumerate(zip(parts, batch.inputs)):
        per_sample = isinstance(b, torch.Tensor) and b.dim() == x.dim() and b.shape[0] == rows and rows > 1
        if per_sample and b.is_floating_point() and bool((bad := _bad_rows(b)).any()):
            return type(exc)(f"{samples(batch.start + bad.nonzero()[:, 0].cpu().numpy())}: baseline {i} contains NaN or inf values; {ALLOW_HINT}")
    t = batch.target
    if model is not None and isinstance(t, torch.Tensor) and t.dim() in (1, 2) and t.shape[0] == rows:
        try:
            with torch.no_grad():
                kw = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v for k, v in (batch.forward_kwargs or {}).items()}
                out = select_output(model(*(x[:1] for x in batch.inputs), *(a[:1] for a in batch.forward_args), **kw), output)
        except Exception:  # noqa: BLE001 - the original error stands
            return None
        dims = tuple(out.shape[1:])
        t2 = t.reshape(rows, -1)
        if t2.shape[1] != len(dims):
            return None
        sizes = torch.tensor(dims, dtype=torch.long, device=t2.device)
        bad = ((t2 < -sizes) | (t2 >= sizes)).any(1)
        if bool(bad.any()):
            index = bad.nonzero()[:, 0].cpu().numpy()
            value = t2[int(index[0])].tolist()
            return type(exc)(f"{samples(batch.start + index)}: target {value[0] if len(value) == 1 else value} is out of range for the model's output shape {dims}")
    return None


def nonfinite_counts(stats_nonfinite: np.ndarray, predicted: np.ndarray | None, **results: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Per sample: non-finite attribution values (from the kernels' stats), plus one for each
    non-finite value among the given per-sample results (F(x), F(x0), delta: those the method
    computes), plus one where the output target="predicted" chose from held NaN/inf. Also a
    description of the first bad sample's problem, for messages."""
    counts = stats_nonfinite.astype(np.int32, copy=True)
    for v in results.values():
        if v is not None:
            counts += ~np.isfinite(v)
    if predicted is not None:
        counts += predicted
    if not counts.any():
        return counts, ""
    first = int(np.nonzero(counts)[0][0])
    what = [f"{name} {v[first]}" for name, v in results.items() if v is not None and not np.isfinite(v[first])]
    if stats_nonfinite[first]:
        what.insert(0, f"{int(stats_nonfinite[first])} non-finite attribution values")
    if predicted is not None and predicted[first]:
        what.append("the model output target='predicted' chose from holds NaN/inf")
    return counts, ", ".join(what)
