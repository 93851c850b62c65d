"""The batch loop of a dataset run: source -> engine -> store, one batch ahead.

``run_batches`` is what ``fastattr.run`` (fastattr/runner.py) does once the plan, the
writer and the probe are settled: batches are read by a prefetch thread (into pinned memory on
CUDA), attributed by the engine under the row budget (on CUDA out-of-memory the rows per forward
halve and the same samples are retried), copied back asynchronously and written one batch later
(fastattr/run_blocks.py), so the device never waits on the disk; on CPU, where the results are
host memory already, each batch is handed over at once. It returns the RunSummary.
"""

from __future__ import annotations

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

from . import budget
from .distributed import LOCAL, Context
from .errors import AttributionInputError
from .methods import BatchResult
from .probe import describe as describe_probe
from .run_blocks import to_host, write_block
from .run_inputs import Baselines, ForwardKwargs, Targets, name_samples
from .run_methods import Batch, MethodPlan
from .run_reduce import AS_COMPUTED, StoredForm
from .sources import Source
from .store import RunWriter

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
    precision_probe: dict = field(default_factory=dict)  # precision != fp32: the probe's error vs fp32 (fastattr/probe.py)

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
        if self.precision_probe:
            out.append(describe_probe(self.precision_probe))
        return out


def _prefetch(source: Source, batches: list[tuple[int, int]], pin: bool) -> Iterator[tuple[int, int, tuple, Any]]:
    """Read batches on a background thread, a few ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop_flag = threading.Event()
    done = threading.Event()  # not Thread.is_alive(): a join() interrupted by Ctrl-C marks a running thread stopped (3.11)

    def work() -> None:
        try:
            for start, stop in batches:
                if stop_flag.is_set():
                    return
                xs, labels = source.read(start, stop)
                if pin:  # CPU rows only: a source of device tensors (a CUDA tensor passed as data) is used as it is
                    xs = tuple(x.pin_memory() if x.device.type == "cpu" else x for x in xs)
                q.put((start, stop, xs, labels))
            q.put(None)
        except BaseException as e:  # surfaces in the consumer
            q.put(e)
        finally:
            done.set()

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
        while not done.is_set():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                done.wait(0.05)


def run_batches(
    writer: RunWriter, model: torch.nn.Module, source: Source, targets: Targets, plan: MethodPlan, baselines: Any, batch_size: int | str,
    examples_per_batch: int | None, dev: torch.device, model_dtype: torch.dtype, progress: bool | None, out: str, total: int,
    ctx: Context = LOCAL, forward_args_inputs: int = 0, allow_nonfinite: bool = False, probe: dict | None = None,
    forward_kwargs: dict[str, Any] | None = None, output: Any = None, form: StoredForm = AS_COMPUTED,
) -> RunSummary:
    if examples_per_batch is None:
        examples_per_batch = plan.examples_per_batch or _default_examples(source, dev)
    # This rank's share of the missing ranges (all of them at world size 1). With a fixed
    # batch_size on CPU the shares are cut on the batch grid, so results match one process bit for bit.
    work = ctx.plan(writer, granule=examples_per_batch if dev.type == "cpu" and batch_size != "auto" else 1)
    if work.complete:
        writer.close()
        logger.info("%s is already complete", out)
        return RunSummary(out, total, 0, 0.0, True, precision_probe=probe or {})
    todo = work.todo
    batches = [(s, min(s + examples_per_batch, stop)) for start, stop in todo for s in range(start, stop, examples_per_batch)]
    remaining = sum(stop - start for start, stop in todo)  # this rank's
    n_attributed = len(source.sample_shapes) - forward_args_inputs  # the rest are forward args
    baselines = Baselines(baselines, total, source.sample_shapes[:n_attributed], dev, model_dtype)
    fwd_kwargs = ForwardKwargs(forward_kwargs, total, dev, model_dtype)
    max_rows = None if batch_size == "auto" else batch_size
    show = (sys.stderr.isatty() if progress is None else progress) and _is_rank_zero()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - work.remaining, unit="sample", disable=not show, dynamic_ncols=True, desc="fastattr")
    deltas, rels = [], []
    t0 = time.perf_counter()
    pending: tuple | None = None  # results copied back asynchronously, written one batch later

    def hand_over() -> None:
        nonlocal pending
        done, pending = pending, None  # never handed over twice, even if put() is interrupted
        write_block(writer, *done, deltas, rels, allow_nonfinite)
        ctx.advance(bar, done[1] - done[0])

    try:
        for start, stop, xs, labels_b in _prefetch(source, batches, pin=dev.type == "cuda"):
            ctx.check_peers()  # another rank failed: stop now instead of finishing this share
            xs = tuple(x.to(dev, model_dtype if x.is_floating_point() else x.dtype, non_blocking=True) for x in xs)
            kw = fwd_kwargs.for_batch(start, stop)
            tgt = targets.for_batch(start, stop, labels_b, model, xs, dev, n_attributed, kw, fused=plan.fuses_predicted) if plan.uses_target else None
            base = baselines.for_batch(start, stop)
            batch = Batch(xs[:n_attributed], tgt, base, start, stop, max_rows, xs[n_attributed:], kw)
            res, max_rows = attribute_with_retry(plan, batch, model, output)
            copied = to_host(res, dev, form)
            copied["predicted_nonfinite"] = targets.nonfinite_rows if plan.uses_target else None
            if pending is not None:
                hand_over()
            pending = (start, stop, copied)
            if "event" not in copied:  # host results already (CPU): hand them over now, written while the next batch computes
                hand_over()
        if pending is not None:
            hand_over()
    except BaseException as exc:
        bar.close()
        ctx.fail(exc)  # the other ranks stop at their next batch
        try:
            if pending is not None:  # computed before the failure: keep it
                done, pending = pending, None
                write_block(writer, *done, deltas, rels, allow_nonfinite)
        finally:
            ctx.finish(writer, remaining, deltas, rels, _residual_stats, failed=True)  # finalize every block handed over so far
        raise
    # Closes the writer; under torchrun rank 0 closes last and merges every rank's shards into
    # one manifest, and the totals (samples, residuals) are the whole job's.
    outcome = ctx.finish(writer, remaining, deltas, rels, _residual_stats, bar=bar)
    bar.close()
    seconds = time.perf_counter() - t0
    summary = RunSummary(out, total, outcome.computed, seconds, outcome.complete, outcome.residual, precision_probe=probe or {})
    if ctx.rank == 0 and plan.params.get("n_steps") == "auto":
        summary.steps = _steps_summary(out)
    if ctx.rank == 0:
        for line in summary.lines():
            logger.info(line)
    return summary


def _default_examples(source: Source, device: torch.device) -> int:
    """Samples per engine call. On CPU the engine's chunking sets the pace and 256 keeps
    blocks small; on CUDA each call has fixed costs (a few host syncs, the F(x)/F(x0) pass),
    so batches carry about 64 MiB of input (16 to 4096 samples)."""
    if device.type != "cuda":
        return 256
    sample_bytes = sum(math.prod(s) for s in source.sample_shapes) * 4
    return max(16, min(4096, (64 * 2**20) // max(1, sample_bytes)))


def attribute_with_retry(plan: MethodPlan, batch: Batch, model: Any = None, output: Any = None) -> tuple[BatchResult, int | None]:
    """One engine call; on CUDA out-of-memory halve the rows per forward and retry the same samples.
    Returns the result and the rows per forward that worked (kept for the next batches). An input
    error is restated for the samples that cause it, by global index."""
    while True:
        try:
            return plan.attribute(batch), batch.max_rows
        except AttributionInputError as exc:
            named = name_samples(exc, batch, model, output)
            if named is None:
                raise
            raise named from exc
        except torch.OutOfMemoryError:
            if batch.inputs:
                budget.forget(batch.inputs[0].device)  # a size remembered there ran out of memory: measure again
            rows = batch.max_rows or batch.inputs[0].shape[0] * plan.rows_per_sample
            if rows <= 1:
                raise
            batch.max_rows = rows // 2
            torch.cuda.empty_cache()
            logger.warning("CUDA out of memory: retrying the batch with at most %d rows per forward", batch.max_rows)


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
