"""Dataset-wide runs: source -> example batches -> engine -> store, resumable.

``run()`` attributes every sample of a dataset and streams the results to HDF5 shards
(fastattr/store/). Batches are read by a prefetch thread (into pinned memory on
CUDA), attributed by the engine under the row budget, copied back asynchronously and
handed to the store's single writer thread, so the device never waits on the disk.
Rerunning the same call continues where a crash or kill stopped it: finalized shards
are trusted, everything else is recomputed, no sample is written twice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .distributed import LOCAL, Context, local_device
from .distributed import setup as setup_distributed
from .errors import AttributionInputError, InputDtypeError, NonFiniteError, OptionError
from .fingerprints import model_fingerprint
from .methods import BatchResult
from .options import Options, positive_int
from .precision import AUTO, PRECISIONS
from .probe import describe as describe_probe
from .probe import measure
from .run_inputs import (
    ALLOW_HINT,
    Baselines,
    ForwardKwargs,
    Targets,
    describe_output,
    name_samples,
    nonfinite_counts,
    samples,
)
from .run_methods import Batch, MethodPlan, describe, plan_method
from .sources import Source, open_source
from .store import VOLATILE_CONFIG_KEYS, Block, RunWriter
from .store.manifest import read_manifest
from .store.schema import MANIFEST_NAME

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
                if pin:
                    xs = tuple(x.pin_memory() for x in xs)
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
    precision_tolerance: float = 0.01,
    precision_warn: float = 0.01,
    probe_samples: int = 4,
    batch_size: int | str = "auto",
    memory_budget: Any = None,
    examples_per_batch: int | None = None,
    storage_dtype: str = "float32",
    compression: str = "lzf",
    shard_size: int = 4096,
    shard_seconds: float | None = 60.0,
    resume: bool = True,
    overwrite: bool = False,
    allow_other_files: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    multiply_by_inputs: bool = True,
    abs: bool = True,  # noqa: A002 - Saliency's name
    forward_args_inputs: int = 0,
    allow_nonfinite: bool = False,
    train_mode: bool = False,
    output: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
    **method_options: Any,
) -> RunSummary:
    """Attribute every sample of ``data`` with ``method`` and store the results in ``out``.

    batch_size: rows per forward ("auto": sized from the memory budget on CUDA, from
    throughput on CPU); examples_per_batch: samples per engine call and per block written
    (None: 256 on CPU, about 64 MiB of input on CUDA). Returns a RunSummary; rerunning the
    same call resumes.

    shard_size, shard_seconds: a shard is finalized after shard_size samples or once it is
    shard_seconds old (None: no time limit), whichever comes first, which bounds what a crash or
    kill can lose: the open shard plus the few blocks in flight (see README, "Crash safety").

    forward_args_inputs: the last k inputs of each sample go to the model as per-sample
    additional_forward_args (e.g. an attention mask after token ids): passed, not attributed.
    method_options: a method's own options (fastattr/run_methods.py EXTRA_OPTIONS), e.g.
    noise_tunnel: nt_type, nt_samples, stdevs, base_method, seed; gradient_shap: references,
    n_samples, stdevs, seed; llm_integrated_gradients: tokenizer, gen_args, seq_only, padding_side,
    layer (data: prompts.jsonl or a list of prompts; see fastattr/llm/runs.py).
    Seeds are recorded; a sample's draws depend only on (seed, index).

    allow_nonfinite: store samples whose inputs, model outputs or attributions hold NaN or inf
    (counted per sample in stats/nonfinite) instead of stopping with an error naming them.
    precision: "fp32", "tf32", "bf16", "fp16", or "auto": the fastest policy whose probe error is
    within precision_tolerance (else fp32). Any policy but fp32 is probed first: the first
    probe_samples samples are attributed in fp32 and in the policy, and the relative L2 error (max,
    median) is recorded in the manifest (config "precision_probe") and the summary, with a warning
    above precision_warn (fastattr/probe.py).

    train_mode: run the model in train mode (BatchNorm batch statistics, dropout); by default
    the model runs in eval mode. Either way each module's mode is restored afterwards, and in
    train mode so are its buffers (BatchNorm's running statistics).

    output: which tensor of the model's output to attribute and to take target="predicted" from
    (fastattr.Options: a key, an index or a callable; default: the output itself, its .logits or a
    "logits" key). forward_kwargs: keyword arguments for the model's forward; an array or tensor
    with one row per sample (e.g. an attention mask) is sliced per batch like the data. Both are
    recorded in the run's config (arrays by hash, a callable by its qualified name).
    """
    for flag, value in (("allow_nonfinite", allow_nonfinite), ("train_mode", train_mode)):
        if not isinstance(value, bool):
            raise OptionError(f"{flag} must be True or False, got {value!r}")
    # the probe settings, output= and forward_kwargs= are checked as a call's options are (OptionError), before any work
    Options(precision=precision, precision_tolerance=precision_tolerance, precision_warn=precision_warn, probe_samples=probe_samples,
            output=output, forward_kwargs=forward_kwargs)  # fmt: skip
    make_plan = functools.partial(
        plan_method, model, method,
        {"n_steps": n_steps, "rule": rule, "baselines": baselines, "multiply_by_inputs": multiply_by_inputs, "abs": abs,
         "tolerance": tolerance, "max_steps": max_steps, "abs_tolerance": abs_tolerance},
        memory_budget=memory_budget, extra=method_options, allow_nonfinite=allow_nonfinite, output=output,
    )  # fmt: skip
    plan = make_plan(precision="fp32" if precision == AUTO else precision)  # auto: replanned once the probe chose
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise OptionError(f"batch_size must be 'auto' or a positive int, got {batch_size!r}")
    if examples_per_batch is not None:
        examples_per_batch = positive_int("examples_per_batch", examples_per_batch)
    if shard_seconds is not None and (isinstance(shard_seconds, bool) or not isinstance(shard_seconds, (int, float)) or not shard_seconds > 0):
        raise OptionError(f"shard_seconds must be a positive number of seconds or None (no time limit), got {shard_seconds!r}")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    model_dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    source = plan.make_source(data, labels) if plan.make_source is not None else open_source(data, labels)
    total = len(source)
    targets = Targets(target, source, total, allow_nonfinite, output)
    n_inputs = len(source.sample_shapes)
    if isinstance(forward_args_inputs, bool) or not isinstance(forward_args_inputs, int) or not 0 <= forward_args_inputs < n_inputs:
        raise OptionError(f"forward_args_inputs must be an int in [0, {n_inputs}) for data with {n_inputs} input(s) per sample, got {forward_args_inputs!r}")
    if plan.needs_float:  # before any forward: an integer batch would fail deep inside the model
        for i, dt in enumerate(source.dtypes[: n_inputs - forward_args_inputs]):
            if not dt.is_floating_point:
                raise InputDtypeError(
                    f"input {i} of the data has dtype {dt}; {plan.name} interpolates inputs and needs floating point "
                    "(convert the data to float, or for token ids use method='layer_ig' on the embedding layer)"
                )
    config = {
        "method": plan.name,
        "params": plan.params,
        "precision": precision,
        "target": describe(target) if plan.uses_target else None,
        "storage_dtype": storage_dtype,
        "compression": compression,
        "shard_size": shard_size,
        "train_mode": train_mode,
        "allow_nonfinite": allow_nonfinite,  # volatile: resuming with it changed is allowed (values are counted either way)
        "shard_seconds": shard_seconds,  # volatile like shard_size: shard boundaries, not results
        "fingerprints": {"model": model_fingerprint(model), "data": source.fingerprint()},
        "versions": {"fastattr": __version__, "torch": torch.__version__},
    }
    if forward_args_inputs:  # only when used, so runs made before the option still resume
        config["forward_args_inputs"] = forward_args_inputs
    if output is not None and plan.uses_target:  # likewise; activations never read the output
        config["output"] = describe_output(output)
    if forward_kwargs:
        config["forward_kwargs"] = ForwardKwargs.describe(forward_kwargs)
    # Under torchrun each rank runs this on its share of the samples (fastattr/distributed.py);
    # without it (or at world size 1) ctx changes nothing.
    dev = local_device(dev)  # cuda -> cuda:LOCAL_RANK under torchrun
    ctx = setup_distributed(dev)
    if ctx.world_size > 1 and param is not None and param.device != dev:
        logger.info("rank %d: moving the model to %s", ctx.rank, dev)
        model.to(dev)
    make_writer = functools.partial(
        RunWriter, out, config=config, total=total, shard_rows=shard_size, storage_dtype=storage_dtype, compression=compression,
        max_shard_seconds=shard_seconds, allow_other_files=allow_other_files,
        volatile_keys=VOLATILE_CONFIG_KEYS | {"versions", "shard_size", "shard_seconds", "allow_nonfinite", "precision_probe"},
    )  # fmt: skip
    writer: RunWriter | None = None
    try:
        with model_mode(model, train_mode):
            probe: dict = {}
            if precision != "fp32":
                recorded = _recorded_choice(out, precision) if resume and not overwrite else None
                if recorded is not None:  # an auto run resumes with the policy it chose, so all its samples share one
                    probe = recorded
                    logger.info("resuming with the recorded choice of precision='auto': %s", describe_probe(probe))
                else:
                    if precision == AUTO and ctx.world_size > 1:
                        raise OptionError("precision='auto' under torchrun: ranks could time the policies differently; pass the policy (run auto once on one process to see its choice)")
                    probe = _probe(make_plan, precision, source, targets, baselines, model, dev, model_dtype, n_inputs - forward_args_inputs,
                                   samples=probe_samples, tolerance=precision_tolerance, warn=precision_warn,
                                   forward_kwargs=forward_kwargs)  # fmt: skip
                config["precision_probe"] = probe  # volatile: a re-measured probe never blocks a resume
                if precision == AUTO:
                    plan = make_plan(precision=probe["policy"])
            writer = ctx.open_writer(make_writer, resume=resume, overwrite=overwrite)
            return _run_batches(writer, model, source, targets, plan, baselines, batch_size, examples_per_batch, dev, model_dtype, progress, str(out), total,
                                ctx=ctx, forward_args_inputs=forward_args_inputs, allow_nonfinite=allow_nonfinite, probe=probe,
                                forward_kwargs=forward_kwargs, output=output)  # fmt: skip
    except BaseException as exc:
        ctx.fail(exc)  # other ranks stop instead of waiting for this one (no-op for one process)
        if writer is not None:
            writer.abort()  # releases the directory if the failure came before the batch loop (no-op once closed)
        raise
    finally:
        ctx.close()


def _recorded_choice(out: Any, precision: str) -> dict | None:
    """precision='auto' resuming: the probe (with its choice) recorded by the run in ``out``, if any."""
    path = Path(out) / MANIFEST_NAME
    if precision != AUTO or not path.is_file():
        return None
    try:
        config = read_manifest(path)["config"]
    except Exception:  # an unreadable manifest is the writer's to report
        return None
    probe = config.get("precision_probe")
    if config.get("precision") == AUTO and isinstance(probe, dict) and probe.get("policy") in PRECISIONS:
        return probe
    return None


def _probe(
    make_plan: Any, precision: str, source: Source, targets: Targets, baselines: Any, model: torch.nn.Module, dev: torch.device,
    model_dtype: torch.dtype, n_attributed: int, *, samples: int, tolerance: float, warn: float, forward_kwargs: dict[str, Any] | None = None,
) -> dict:
    """The precision probe of a run (fastattr/probe.py) on its first ``samples`` samples, as recorded in the manifest."""
    k = min(samples, len(source))
    xs, labels = source.read(0, k)
    xs = tuple(x.to(dev, model_dtype if x.is_floating_point() else x.dtype) for x in xs)
    base = Baselines(baselines, len(source), source.sample_shapes[:n_attributed], dev, model_dtype).for_batch(0, k)
    kw = ForwardKwargs(forward_kwargs, len(source), dev, model_dtype).for_batch(0, k)
    plans: dict[str, MethodPlan] = {}

    def call(policy: str) -> list[torch.Tensor]:
        plan = plans.setdefault(policy, make_plan(precision=policy))
        tgt = targets.for_batch(0, k, labels, model, xs, dev, n_attributed, kw) if plan.uses_target else None
        batch = Batch(xs[:n_attributed], tgt, base, 0, k, None, xs[n_attributed:], kw)
        return _attribute_with_retry(plan, batch, model)[0].attributions

    return measure(call, precision, dev, tolerance=tolerance, warn=warn).as_dict()


@contextlib.contextmanager
def model_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    """Every module in eval mode (train=True: train mode) for the run; afterwards, also after an
    error, each module gets its own earlier mode back, and in train mode the buffers too, so a
    run never moves BatchNorm's running statistics. torch.export programs have no mode to set:
    theirs was fixed when they were exported."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    try:
        model.train(train)
    except NotImplementedError as exc:  # torch.export's module(): "Calling eval() is not supported yet"
        if train:
            raise OptionError(f"train_mode=True cannot apply to this model ({exc}); a torch.export program runs in the mode it was exported in") from exc
        logger.debug("model mode left as exported: %s", exc)
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _run_batches(
    writer: RunWriter, model: torch.nn.Module, source: Source, targets: Targets, plan: MethodPlan, baselines: Any, batch_size: int | str,
    examples_per_batch: int | None, dev: torch.device, model_dtype: torch.dtype, progress: bool | None, out: str, total: int,
    ctx: Context = LOCAL, forward_args_inputs: int = 0, allow_nonfinite: bool = False, probe: dict | None = None,
    forward_kwargs: dict[str, Any] | None = None, output: Any = None,
) -> RunSummary:
    work = ctx.plan(writer)  # this rank's share of the missing ranges (all of them at world size 1)
    if work.complete:
        writer.close()
        logger.info("%s is already complete", out)
        return RunSummary(out, total, 0, 0.0, True, precision_probe=probe or {})
    if examples_per_batch is None:
        examples_per_batch = plan.examples_per_batch or _default_examples(source, dev)
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
    try:
        for start, stop, xs, labels_b in _prefetch(source, batches, pin=dev.type == "cuda"):
            ctx.check_peers()  # another rank failed: stop now instead of finishing this share
            xs = tuple(x.to(dev, model_dtype if x.is_floating_point() else x.dtype, non_blocking=True) for x in xs)
            kw = fwd_kwargs.for_batch(start, stop)
            tgt = targets.for_batch(start, stop, labels_b, model, xs, dev, n_attributed, kw) if plan.uses_target else None
            base = baselines.for_batch(start, stop)
            batch = Batch(xs[:n_attributed], tgt, base, start, stop, max_rows, xs[n_attributed:], kw)
            res, max_rows = _attribute_with_retry(plan, batch, model, output)
            copied = _to_host(res, dev)
            copied["predicted_nonfinite"] = targets.nonfinite_rows if plan.uses_target else None
            if pending is not None:
                done, pending = pending, None  # never handed over twice, even if put() is interrupted
                _write(writer, *done, deltas, rels, allow_nonfinite)
                ctx.advance(bar, done[1] - done[0])
            pending = (start, stop, copied)
        if pending is not None:
            done, pending = pending, None
            _write(writer, *done, deltas, rels, allow_nonfinite)
            ctx.advance(bar, done[1] - done[0])
    except BaseException as exc:
        bar.close()
        ctx.fail(exc)  # the other ranks stop at their next batch
        try:
            if pending is not None:  # computed before the failure: keep it
                done, pending = pending, None
                _write(writer, *done, deltas, rels, allow_nonfinite)
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


def _attribute_with_retry(plan: MethodPlan, batch: Batch, model: Any = None, output: Any = None) -> tuple[BatchResult, int | None]:
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


def _write(writer: RunWriter, start: int, stop: int, c: dict, deltas: list, rels: list, allow_nonfinite: bool) -> None:
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
    stats = {k: (v.numpy().astype(np.int32) if k == "nonfinite" else v.float().numpy()) for k, v in c["stats"].items()}
    # stats/nonfinite counts every non-finite value of the sample's results, not only its attributions
    computed = {k: (c[k].float().numpy() if c[k] is not None else None) for k in ("output", "baseline_output", "delta")}
    stats["nonfinite"], what = nonfinite_counts(stats["nonfinite"], c.get("predicted_nonfinite"), **computed)
    if what:
        bad = start + np.nonzero(stats["nonfinite"])[0]
        if not allow_nonfinite:
            raise NonFiniteError(f"{samples(bad)}: non-finite results (sample {bad[0]}: {what}); fix the model or data, or {ALLOW_HINT}")
        logger.warning("%s: non-finite results stored (sample %d: %s), counted in stats/nonfinite", samples(bad), bad[0], what)
    block = Block(
        start=start,
        stop=stop,
        attributions={n: a.numpy() for n, a in zip(names, c["attributions"])},
        target=target_np,
        output=f32(c["output"]),
        baseline_output=f32(c["baseline_output"]),
        delta=f32(c["delta"]),
        n_steps=n_steps,
        stats=stats,
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
