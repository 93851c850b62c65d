"""Dataset-wide runs: source -> example batches -> engine -> store, resumable.

``run()`` attributes every sample of a dataset and streams the results to HDF5 shards
(fastattr/store.py). Batches are read by a prefetch thread (into pinned memory on
CUDA), attributed by the engine under the row budget, copied back asynchronously and
handed to the store's single writer thread, so the device never waits on the disk.
Rerunning the same call continues where a crash or kill stopped it: finalized shards
are trusted, everything else is recomputed, no sample is written twice.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import __version__
from .distributed import LOCAL, Context, local_device
from .distributed import setup as setup_distributed
from .methods import BatchResult
from .run_methods import Batch, MethodPlan, describe, plan_method
from .sources import Source, SourceError, open_source
from .store import VOLATILE_CONFIG_KEYS, Block, RunWriter

logger = logging.getLogger(__name__)

PREFETCH_BATCHES = 2


@dataclass
class RunSummary:
    run_dir: str
    total: int
    computed: int  # samples attributed by this call
    seconds: float
    complete: bool
    residual: dict = field(default_factory=dict)  # over this call's samples
    steps: dict = field(default_factory=dict)  # adaptive runs: per-sample steps over the whole stored run

    @property
    def throughput(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")

    def lines(self) -> list[str]:
        out = [f"{self.run_dir}: {'complete' if self.complete else 'incomplete'}, {self.total} samples"]
        if self.computed:
            out.append(f"attributed {self.computed} samples in {self.seconds:.1f} s ({self.throughput:,.1f} samples/s)")
        else:
            out.append("nothing to do: every sample was already stored")
        if self.residual:
            r = self.residual
            out.append(
                f"completeness residual |delta|: median {r['median_abs']:.2e}, p99 {r['p99_abs']:.2e}, max {r['max_abs']:.2e}; "
                f"relative to |F(x) - F(x0)|: median {r['median_rel']:.2e}"
            )
        if self.steps:
            st = self.steps
            line = f"adaptive steps over {st['samples']} samples: mean {st['mean']:.1f}, median {st['median']:g}, p90 {st['p90']:g}, max {st['max']:g}"
            if st["capped"]:
                shown = ", ".join(map(str, st["capped_index"]))
                line += f"; {st['capped']} hit the cap before the tolerance (index {shown}{', ...' if st['capped'] > len(st['capped_index']) else ''})"
            else:
                line += "; every sample met the tolerance"
            out.append(line)
        return out


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and values of all parameters and buffers."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Targets:
    """Per-batch targets from a fixed int or tuple, the labels, the prediction, or an array."""

    def __init__(self, spec: Any, source: Source, total: int) -> None:
        if isinstance(spec, str) and spec.endswith(".npy"):
            spec = np.load(spec, mmap_mode="r")
        self.spec = spec
        self.array = None
        if isinstance(spec, str):
            if spec not in ("label", "predicted"):
                raise ValueError(f"target must be an int, a tuple of ints, 'label', 'predicted', a per-sample array or a .npy path; got {spec!r}")
            if spec == "label" and not source.has_labels:
                raise SourceError("target='label' but the data has no labels")
        elif spec is None or isinstance(spec, int) or (isinstance(spec, tuple) and all(isinstance(v, int) for v in spec)):
            pass  # the same target for every sample, as in attribute()
        else:
            arr = spec.detach().cpu() if isinstance(spec, torch.Tensor) else torch.as_tensor(np.asarray(spec))
            if arr.is_floating_point() or arr.is_complex() or arr.dtype == torch.bool:
                raise ValueError(f"a per-sample target array must hold integers, got dtype {arr.dtype}")
            if arr.dim() not in (1, 2) or arr.shape[0] != total:
                raise ValueError(f"the per-sample target array has shape {tuple(arr.shape)}; expected ({total},) or ({total}, k) for {total} samples")
            self.array = arr.long()

    def for_batch(self, start: int, stop: int, labels: torch.Tensor | None, model: Any, inputs: tuple, device: torch.device) -> Any:
        if self.array is not None:
            return self.array[start:stop].to(device)
        if isinstance(self.spec, str) and self.spec == "label":
            if bool((labels < 0).any()):  # e.g. -1 for "unlabelled": never wrap it to the last class
                bad = start + int((labels < 0).nonzero()[0, 0])
                raise SourceError(f"sample {bad} has label {int(labels[bad - start])}; target='label' needs class indices >= 0")
            return labels.to(device)
        if isinstance(self.spec, str) and self.spec == "predicted":
            with torch.no_grad():
                out = model(*inputs)
            per_sample = out.shape[1:]
            if math.prod(per_sample) == 1:
                return None  # a single output per sample: nothing to pick
            flat = out.reshape(out.shape[0], -1).argmax(1)
            if len(per_sample) == 1:
                return flat
            return torch.stack(torch.unravel_index(flat, tuple(per_sample)), dim=1)  # (B, k) indices
        return self.spec


def _prefetch(source: Source, batches: list[tuple[int, int]], pin: bool) -> Iterator[tuple[int, int, tuple, Any]]:
    """Read batches on a background thread, a few ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop_flag = threading.Event()

    def work() -> None:
        try:
            for start, stop in batches:
                if stop_flag.is_set():
                    return
                xs, labels = source.read(start, stop)
                if pin:
                    xs = tuple(x.pin_memory() for x in xs)
                q.put((start, stop, xs, labels))
            q.put(None)
        except BaseException as e:  # surfaces in the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="fastattr-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop_flag.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def run(
    model: torch.nn.Module,
    data: Any,
    out: str,
    method: str = "integrated_gradients",
    *,
    labels: Any = None,
    target: Any = "predicted",
    baselines: Any = None,
    n_steps: int | str = 50,
    rule: str | None = None,
    tolerance: float | None = None,
    max_steps: int | None = None,
    abs_tolerance: float | None = None,
    precision: str = "fp32",
    batch_size: int | str = "auto",
    memory_budget: Any = None,
    examples_per_batch: int | None = None,
    storage_dtype: str = "float32",
    compression: str = "lzf",
    shard_size: int = 4096,
    resume: bool = True,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    multiply_by_inputs: bool = True,
    abs: bool = True,  # noqa: A002 - Saliency's name
    forward_args_inputs: int = 0,
    **method_options: Any,
) -> RunSummary:
    """Attribute every sample of ``data`` with ``method`` and store the results in ``out``.

    batch_size: rows per forward ("auto": sized from the memory budget on CUDA, from
    throughput on CPU); examples_per_batch: samples per engine call and per block written
    (None: 256 on CPU, about 64 MiB of input on CUDA). Returns a RunSummary; rerunning the
    same call resumes.

    forward_args_inputs: the last k inputs of each sample go to the model as per-sample
    additional_forward_args (e.g. an attention mask after token ids): passed, not attributed.
    method_options: a method's own options (fastattr/run_methods.py EXTRA_OPTIONS), e.g.
    noise_tunnel: nt_type, nt_samples, stdevs, base_method, seed; gradient_shap: references,
    n_samples, stdevs, seed. Seeds are recorded; a sample's draws depend only on (seed, index).
    """
    plan = plan_method(
        model, method,
        {"n_steps": n_steps, "rule": rule, "baselines": baselines, "multiply_by_inputs": multiply_by_inputs, "abs": abs,
         "tolerance": tolerance, "max_steps": max_steps, "abs_tolerance": abs_tolerance},
        precision=precision, memory_budget=memory_budget, extra=method_options,
    )  # fmt: skip
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be 'auto' or a positive int, got {batch_size!r}")
    if examples_per_batch is not None and (not isinstance(examples_per_batch, int) or examples_per_batch < 1):
        raise ValueError(f"examples_per_batch must be a positive int, got {examples_per_batch!r}")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    model_dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    source = open_source(data, labels)
    total = len(source)
    targets = _Targets(target, source, total)
    n_inputs = len(source.sample_shapes)
    if isinstance(forward_args_inputs, bool) or not isinstance(forward_args_inputs, int) or not 0 <= forward_args_inputs < n_inputs:
        raise ValueError(f"forward_args_inputs must be an int in [0, {n_inputs}) for data with {n_inputs} input(s) per sample, got {forward_args_inputs!r}")
    config = {
        "method": plan.name,
        "params": plan.params,
        "precision": precision,
        "target": describe(target) if plan.uses_target else None,
        "storage_dtype": storage_dtype,
        "compression": compression,
        "shard_size": shard_size,
        "fingerprints": {"model": model_fingerprint(model), "data": source.fingerprint()},
        "versions": {"fastattr": __version__, "torch": torch.__version__},
    }
    if forward_args_inputs:  # only when used, so runs made before the option still resume
        config["forward_args_inputs"] = forward_args_inputs
    # Under torchrun each rank runs this on its share of the samples (fastattr/distributed.py);
    # without it (or at world size 1) ctx changes nothing.
    dev = local_device(dev)  # cuda -> cuda:LOCAL_RANK under torchrun
    ctx = setup_distributed(dev)
    if ctx.world_size > 1 and param is not None and param.device != dev:
        logger.info("rank %d: moving the model to %s", ctx.rank, dev)
        model.to(dev)
    make_writer = functools.partial(
        RunWriter, out, config=config, total=total, shard_rows=shard_size, storage_dtype=storage_dtype, compression=compression,
        volatile_keys=VOLATILE_CONFIG_KEYS | {"versions", "shard_size"},
    )  # fmt: skip
    writer: RunWriter | None = None
    try:
        writer = ctx.open_writer(make_writer, resume=resume, overwrite=overwrite)
        return _run_batches(writer, model, source, targets, plan, baselines, batch_size, examples_per_batch, dev, model_dtype, progress, str(out), total,
                            ctx=ctx, forward_args_inputs=forward_args_inputs)  # fmt: skip
    except BaseException as exc:
        ctx.fail(exc)  # other ranks stop instead of waiting for this one (no-op for one process)
        if writer is not None:
            writer.abort()  # releases the directory if the failure came before the batch loop (no-op once closed)
        raise
    finally:
        ctx.close()


def _run_batches(
    writer: RunWriter, model: torch.nn.Module, source: Source, targets: _Targets, plan: MethodPlan, baselines: Any, batch_size: int | str,
    examples_per_batch: int | None, dev: torch.device, model_dtype: torch.dtype, progress: bool | None, out: str, total: int,
    ctx: Context = LOCAL, forward_args_inputs: int = 0,
) -> RunSummary:
    work = ctx.plan(writer)  # this rank's share of the missing ranges (all of them at world size 1)
    if work.complete:
        writer.close()
        logger.info("%s is already complete", out)
        return RunSummary(out, total, 0, 0.0, True)
    if examples_per_batch is None:
        examples_per_batch = _default_examples(source, dev)
    todo = work.todo
    batches = [(s, min(s + examples_per_batch, stop)) for start, stop in todo for s in range(start, stop, examples_per_batch)]
    remaining = sum(stop - start for start, stop in todo)  # this rank's
    n_attributed = len(source.sample_shapes) - forward_args_inputs  # the rest are forward args
    baselines = _Baselines(baselines, total, source.sample_shapes[:n_attributed], dev, model_dtype)
    max_rows = None if batch_size == "auto" else batch_size
    show = (sys.stderr.isatty() if progress is None else progress) and _is_rank_zero()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - work.remaining, unit="sample", disable=not show, dynamic_ncols=True, desc="fastattr")
    deltas, rels = [], []
    t0 = time.perf_counter()
    pending: tuple | None = None  # results copied back asynchronously, written one batch later
    try:
        for start, stop, xs, labels_b in _prefetch(source, batches, pin=dev.type == "cuda"):
            ctx.check_peers()  # another rank failed: stop now instead of finishing this share
            xs = tuple(x.to(dev, model_dtype if x.is_floating_point() else x.dtype, non_blocking=True) for x in xs)
            tgt = targets.for_batch(start, stop, labels_b, model, xs, dev) if plan.uses_target else None
            base = baselines.for_batch(start, stop)
            batch = Batch(xs[:n_attributed], tgt, base, start, stop, max_rows, xs[n_attributed:])
            res, max_rows = _attribute_with_retry(plan, batch)
            copied = _to_host(res, dev)
            if pending is not None:
                done, pending = pending, None  # never handed over twice, even if put() is interrupted
                _write(writer, *done, deltas, rels)
                ctx.advance(bar, done[1] - done[0])
            pending = (start, stop, copied)
        if pending is not None:
            done, pending = pending, None
            _write(writer, *done, deltas, rels)
            ctx.advance(bar, done[1] - done[0])
    except BaseException as exc:
        bar.close()
        ctx.fail(exc)  # the other ranks stop at their next batch
        try:
            if pending is not None:  # computed before the failure: keep it
                done, pending = pending, None
                _write(writer, *done, deltas, rels)
        finally:
            ctx.finish(writer, remaining, deltas, rels, _residual_stats, failed=True)  # finalize every block handed over so far
        raise
    # Closes the writer; under torchrun rank 0 closes last and merges every rank's shards into
    # one manifest, and the totals (samples, residuals) are the whole job's.
    outcome = ctx.finish(writer, remaining, deltas, rels, _residual_stats, bar=bar)
    bar.close()
    seconds = time.perf_counter() - t0
    summary = RunSummary(out, total, outcome.computed, seconds, outcome.complete, outcome.residual)
    if ctx.rank == 0 and plan.params.get("n_steps") == "auto":
        summary.steps = _steps_summary(out)
    if ctx.rank == 0:
        for line in summary.lines():
            logger.info(line)
    return summary


class _Baselines:
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


def _default_examples(source: Source, device: torch.device) -> int:
    """Samples per engine call. On CPU the engine's chunking sets the pace and 256 keeps
    blocks small; on CUDA each call has fixed costs (a few host syncs, the F(x)/F(x0) pass),
    so batches carry about 64 MiB of input (16 to 4096 samples)."""
    if device.type != "cuda":
        return 256
    sample_bytes = sum(math.prod(s) for s in source.sample_shapes) * 4
    return max(16, min(4096, (64 * 2**20) // max(1, sample_bytes)))


def _attribute_with_retry(plan: MethodPlan, batch: Batch) -> tuple[BatchResult, int | None]:
    """One engine call; on CUDA out-of-memory halve the rows per forward and retry the same samples.
    Returns the result and the rows per forward that worked (kept for the next batches)."""
    while True:
        try:
            return plan.attribute(batch), batch.max_rows
        except torch.OutOfMemoryError:
            rows = batch.max_rows or batch.inputs[0].shape[0] * plan.rows_per_sample
            if rows <= 1:
                raise
            batch.max_rows = rows // 2
            torch.cuda.empty_cache()
            logger.warning("CUDA out of memory: retrying the batch with at most %d rows per forward", batch.max_rows)


def _to_host(res: BatchResult, dev: torch.device) -> dict:
    """Start asynchronous device-to-host copies of everything a block needs."""
    pin = dev.type == "cuda"

    def host(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if not pin:
            return t.detach()
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t.detach(), non_blocking=True)

    copied = {
        "attributions": [host(a.float()) for a in res.attributions],
        "stats": {k: host(getattr(res.stats, k)) for k in ("sum", "l1", "l2", "absmax", "nonfinite")},
        "output": host(res.output),
        "baseline_output": host(res.baseline_output),
        "delta": host(res.delta),
        "target": host(res.target),
        "n_steps": host(res.n_steps) if isinstance(res.n_steps, torch.Tensor) else res.n_steps,
        "names": res.names,
        "extras": {k: host(v) for k, v in res.extras.items()},
    }
    if pin:
        event = torch.cuda.Event()
        event.record()
        copied["event"] = event
    return copied


def _write(writer: RunWriter, start: int, stop: int, c: dict, deltas: list, rels: list) -> None:
    if "event" in c:
        c["event"].synchronize()
    rows = stop - start
    nan = np.full(rows, np.nan, dtype=np.float32)

    def f32(t: torch.Tensor | None) -> np.ndarray:
        return nan if t is None else t.float().numpy()

    names = c["names"] or (["x"] if len(c["attributions"]) == 1 else [f"input_{i}" for i in range(len(c["attributions"]))])
    n_steps = c["n_steps"].numpy().astype(np.int32) if isinstance(c["n_steps"], torch.Tensor) else np.full(rows, c["n_steps"], dtype=np.int32)
    target = c["target"]
    target_np = np.full(rows, -1, dtype=np.int64) if target is None else target.numpy().astype(np.int64)
    if target_np.ndim == 2 and target_np.shape[1] == 1:
        target_np = target_np[:, 0]
    block = Block(
        start=start,
        stop=stop,
        attributions={n: a.numpy() for n, a in zip(names, c["attributions"])},
        target=target_np,
        output=f32(c["output"]),
        baseline_output=f32(c["baseline_output"]),
        delta=f32(c["delta"]),
        n_steps=n_steps,
        stats={k: (v.numpy().astype(np.int32) if k == "nonfinite" else v.float().numpy()) for k, v in c["stats"].items()},
        extras={k: v.numpy() for k, v in c["extras"].items()},
    )
    writer.put(block)
    if c["delta"] is not None:
        d = np.abs(block.delta)
        deltas.append(d)
        rels.append(d / np.maximum(np.abs(block.output - block.baseline_output), 1e-12))


def _steps_summary(run_dir: str, shown: int = 10) -> dict:
    """Distribution of per-sample steps and the samples that hit the cap, read back from the
    stored run (n_steps, index and extras/converged: 13 bytes a sample), so it covers every rank."""
    from .store import open_run

    with open_run(run_dir) as store:
        steps, index = store.field("n_steps"), store.field("index")
        converged = store.field("extras/converged") if len(store) else np.zeros(0, bool)
    if not steps.size:
        return {}
    capped = index[~converged.astype(bool)]
    return {
        "samples": int(steps.size),
        "mean": float(steps.mean()),
        "median": float(np.median(steps)),
        "p90": float(np.percentile(steps, 90)),
        "max": int(steps.max()),
        "histogram": {int(v): int(c) for v, c in zip(*np.unique(steps, return_counts=True))},
        "capped": int(capped.size),
        "capped_index": capped[:shown].tolist(),
    }


def _residual_stats(deltas: list, rels: list) -> dict:
    if not deltas:
        return {}
    d, r = np.concatenate(deltas), np.concatenate(rels)
    d, r = d[np.isfinite(d)], r[np.isfinite(r)]
    if not d.size:
        return {}
    return {
        "median_abs": float(np.median(d)),
        "p99_abs": float(np.percentile(d, 99)),
        "max_abs": float(d.max()),
        "median_rel": float(np.median(r)) if r.size else math.nan,
    }


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
