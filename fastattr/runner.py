"""Dataset-wide runs: ``fastattr.run(...)`` checks and records a run, then hands it to the loop.

``run()`` attributes every sample of a dataset and streams the results to HDF5 shards
(fastattr/store/). This module validates the options, plans the method
(fastattr/run_methods.py), fingerprints model and data into the config a resume compares,
puts the model in eval mode (restored after), measures the precision probe where the policy is
not fp32, opens the writer (under torchrun, this rank's share) and runs the batch loop
(fastattr/run_loop.py). Rerunning the same call continues where a crash or kill stopped it:
finalized shards are trusted, everything else is recomputed, no sample is written twice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .distributed import local_device
from .distributed import setup as setup_distributed
from .errors import InputDtypeError, OptionError
from .fingerprints import _hash_code, model_fingerprint
from .host_memory import reuse_freed_pages
from .options import Options, positive_int
from .precision import AUTO, PRECISIONS
from .probe import describe as describe_probe
from .probe import measure
from .run_inputs import Baselines, ForwardKwargs, Targets, describe_output
from .run_loop import RunSummary, attribute_with_retry, run_batches
from .run_methods import Batch, MethodPlan, describe, plan_method
from .run_reduce import StoredForm, channel_reduce_config
from .sources import Source, open_source
from .store import RunWriter
from .store.manifest import read_manifest
from .store.schema import MANIFEST_NAME, RUN_VOLATILE_KEYS

logger = logging.getLogger(__name__)

__all__ = ["RunSummary", "model_mode", "run"]


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
    channel_reduce: str | None = None,
    compression: str = "auto",
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
    compile: bool = False,  # noqa: A002 - Options' name
    output: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
    **method_options: Any,
) -> RunSummary:
    """Attribute every sample of ``data`` with ``method`` and store the results in ``out``.

    batch_size: the most rows per forward ("auto": sized from the memory budget on CUDA, from
    throughput on CPU; on CPU an int above 32 bounds the tuner, which may pick fewer rows, so
    bit-identical reruns need 32 or less); examples_per_batch: samples per engine call and per block written
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

    compile: torch.compile the model's forward for the engine's chunks (fixed chunk shapes, one
    layout; README "Compiled models"); off by default: on the 2-core CPU it measured slower
    (benchmarks/RESULTS.md, "CPU rows"). Recorded in the config when set.

    train_mode: run the model in train mode (BatchNorm batch statistics, dropout); by default
    the model runs in eval mode. Either way each module's mode is restored afterwards, and in
    train mode so are its buffers (BatchNorm's running statistics).

    output: which tensor of the model's output to attribute and to take target="predicted" from
    (fastattr.Options: a key, an index or a callable; default: the output itself, its .logits or a
    "logits" key). forward_kwargs: keyword arguments for the model's forward; an array or tensor
    with one row per sample (e.g. an attention mask) is sliced per batch like the data. Both are
    recorded in the run's config (arrays by hash, a callable by its qualified name and a digest of its code).

    Storage reductions (README, "Storage reductions"): storage_dtype="float16" halves the bytes
    (values beyond 65504 become inf, counted in stats/nonfinite); channel_reduce="sum" | "abs" | "l2"
    stores each (C, H, W) input attribution as one (H, W) map, reduced over the channel dim on the
    device before the copy to the host (fastattr/run_reduce.py; input-attributing methods, every
    attributed input needs >= 3 dims per sample). stats/* and delta stay those of the full
    attributions. Both are recorded in the run's config; a resume with another value is refused.
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
        memory_budget=memory_budget, extra=method_options, allow_nonfinite=allow_nonfinite, output=output, compile=compile,
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
    reduction = channel_reduce_config(channel_reduce, plan.name, source.sample_shapes[: n_inputs - forward_args_inputs])
    config = {
        "method": plan.name,
        "params": plan.params,
        "precision": precision,
        "target": describe(target) if plan.uses_target else None,
        "storage_dtype": storage_dtype,
        "compression": compression,  # volatile: each shard's filter is in the shard; any mix reads back (plain h5py too)
        "shard_size": shard_size,
        "train_mode": train_mode,
        "allow_nonfinite": allow_nonfinite,  # volatile: resuming with it changed is allowed (values are counted either way)
        "shard_seconds": shard_seconds,  # volatile like shard_size: shard boundaries, not results
        "fingerprints": {"model": model_fingerprint(model), "data": source.fingerprint()},
        "versions": {"fastattr": __version__, "torch": torch.__version__},
    }
    if reduction is not None:  # only when used, so runs made before the option still resume
        config["channel_reduce"] = reduction
    if compile:  # only when used, like the options below; compiled kernels may round differently, so a resume compares it
        config["compile"] = True
    if forward_args_inputs:  # only when used, so runs made before the option still resume
        config["forward_args_inputs"] = forward_args_inputs
    if output is not None and plan.uses_target:  # likewise; activations never read the output
        config["output"] = describe_output(output)
        if callable(output) and (code := callable_code(output)) is not None:  # a name alone does not tell two lambdas apart
            config["output"]["code"] = code
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
        volatile_keys=RUN_VOLATILE_KEYS,
    )  # fmt: skip
    writer: RunWriter | None = None
    try:
        with model_mode(model, train_mode), reuse_freed_pages(dev.type == "cpu"):  # fastattr/host_memory.py
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
            return run_batches(writer, model, source, targets, plan, baselines, batch_size, examples_per_batch, dev, model_dtype, progress, str(out), total,
                                ctx=ctx, forward_args_inputs=forward_args_inputs, allow_nonfinite=allow_nonfinite, probe=probe,
                                forward_kwargs=forward_kwargs, output=output, form=StoredForm(channel_reduce, storage_dtype == "float16"))  # fmt: skip
    except BaseException as exc:
        ctx.fail(exc)  # other ranks stop instead of waiting for this one (no-op for one process)
        if writer is not None:
            writer.abort()  # releases the directory if the failure came before the batch loop (no-op once closed)
        raise
    finally:
        ctx.close()


_PLAIN = (int, float, str, bool, type(None))


def callable_code(fn: Any) -> str | None:
    """A digest of an output= callable's code: bytecode, names and constants, and the plain values
    (numbers, strings, tuples of them) it closes over or defaults to, so a resume with another
    function of the same name (every lambda is "<lambda>") is refused. None where there is no
    Python code to read (a builtin, functools.partial). Bytecode is per Python version."""
    target = fn if hasattr(fn, "__code__") else vars(type(fn)).get("__call__")  # a callable object: its class's method
    code = getattr(target, "__code__", None)
    if code is None:
        return None
    h = hashlib.sha256()
    _hash_code(h, code)
    values: list[Any] = list(getattr(target, "__defaults__", None) or ())
    for cell in getattr(target, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            values.append(None)
    for v in values:  # other objects' reprs may hold addresses: their type only
        plain = isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(e, _PLAIN) for e in v))
        h.update((repr(v) if plain else f"{type(v).__module__}.{type(v).__qualname__}").encode())
    return h.hexdigest()[:32]


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
        return attribute_with_retry(plan, batch, model)[0].attributions

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
