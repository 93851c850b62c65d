"""`fastattr demo` and `fastattr run`: arguments to a dataset run (fastattr.run), options a method ignores refused."""

from __future__ import annotations

import argparse
import logging
import os

from ..errors import OptionError

LLM_METHODS = ("llm_integrated_gradients", "llm_ig")


logger = logging.getLogger("fastattr")


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    report = run_demo(samples=args.samples, n_steps=args.steps, precision=args.precision, device=args.device, out=args.out)
    print("\n".join(report.lines()))
    return 0


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..llm.text import DEFAULT_GEN_ARGS
    from ..runner import run
    from ..specs import HF_PREFIX, load_data, load_hf, load_model, parse_kv

    llm = args.method in LLM_METHODS or (args.method is None and args.model.startswith(HF_PREFIX))
    method = args.method or ("llm_integrated_gradients" if llm else "ig")
    _refuse_unused(args, method)
    if args.labels is not None and args.target != "label" and not llm:  # a warning, not an error: runs made so keep resuming
        logger.warning("--labels is used only by --target label; this run attributes --target %s and only fingerprints the labels", args.target or "predicted")
    args.steps = 50 if args.steps is None else args.steps
    args.target = "predicted" if args.target is None else args.target
    args.baseline = "zeros" if args.baseline is None else args.baseline
    llm_opts: dict = {}
    if args.model.startswith(HF_PREFIX):
        if args.model_arg:
            raise OptionError("--model-arg is for a package.module:factory model; hf:DIR loads the directory as saved")
        model, tokenizer = load_hf(args.model, device=args.device)
        if llm:
            llm_opts["tokenizer"] = tokenizer
    else:
        model = load_model(args.model, parse_kv(args.model_arg), device=args.device)
    if llm:
        if args.gen_arg:
            llm_opts["gen_args"] = {**DEFAULT_GEN_ARGS, **parse_kv(args.gen_arg)}
        llm_opts.update({"seq_only": args.seq_only, "padding_side": args.padding_side})
    elif args.gen_arg or args.seq_only or args.padding_side != "right":
        raise OptionError("--gen-arg, --seq-only and --padding-side are for --method llm_integrated_gradients")
    data = load_data(args.data, parse_kv(args.data_arg))
    target: object = args.target
    if args.target not in ("predicted", "label") and not args.target.endswith(".npy"):
        try:
            target = int(args.target)
        except ValueError:
            raise OptionError(f"--target must be predicted, label, an int or a .npy file; got {args.target!r}") from None
    baselines: object = None
    if llm:  # a token id or a token string replacing every prompt token (zeros: id 0, Captum's default)
        baselines = None if args.baseline == "zeros" else (int(args.baseline) if args.baseline.lstrip("-").isdigit() else args.baseline)
    elif args.baseline == "mean":
        baselines = _data_mean(data)
    elif args.baseline != "zeros":
        if args.baseline.endswith(".npy"):
            if not os.path.isfile(args.baseline):
                raise OptionError(f"--baseline: no such file: {args.baseline}")
            try:
                baselines = np.load(args.baseline, allow_pickle=False)  # data paths never unpickle
            except ValueError as exc:  # not a .npy array, or an object array (a pickle)
                raise OptionError(f"--baseline {args.baseline}: {exc}") from None
        else:
            try:
                baselines = float(args.baseline)
            except ValueError:
                raise OptionError(f"--baseline must be zeros, a number or a .npy file; got {args.baseline!r}") from None
    summary = run(
        model, data, args.out, method=method, labels=args.labels, target=target, baselines=baselines, n_steps=args.steps,
        tolerance=args.tolerance, max_steps=args.max_steps, forward_args_inputs=args.forward_args_inputs, **_method_options(args), **llm_opts,
        rule=args.rule, precision=args.precision, precision_tolerance=args.precision_tolerance, precision_warn=args.precision_warn, batch_size=args.batch_size, memory_budget=args.memory_budget,
        storage_dtype=args.storage_dtype, compression=args.compression, shard_size=args.shard_size, shard_seconds=args.shard_seconds or None,
        resume=not args.overwrite, overwrite=args.overwrite, allow_other_files=args.allow_other_files, device=args.device, progress=None if not args.quiet else False,
        allow_nonfinite=args.allow_nonfinite, train_mode=args.train_mode, channel_reduce=args.channel_reduce, compile=args.compile,
    )  # fmt: skip
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 prints the job's summary
        print("\n".join(summary.lines()))
    return 0


def _refuse_unused(args: argparse.Namespace, method: str) -> None:
    """An option the method would silently ignore is an error: the run would record and store
    something other than what the command line asked for (--steps with saliency, --target with activations)."""
    from ..run_methods import ALIASES

    name = ALIASES.get(method, method)
    base = ALIASES.get(args.base_method or "ig", args.base_method or "ig")
    integrates = name in ("integrated_gradients", "layer_integrated_gradients", "llm_integrated_gradients") or (
        name == "noise_tunnel" and base == "integrated_gradients")
    given = {
        "--steps": args.steps is not None and not integrates, "--rule": args.rule is not None and not integrates,
        "--tolerance": args.tolerance is not None and not integrates, "--max-steps": args.max_steps is not None and not integrates,
        "--baseline": args.baseline is not None and not integrates, "--target": args.target is not None and name in ("activations", "llm_integrated_gradients"),
    }  # fmt: skip
    if args.rule == "simpson" and args.steps != "auto":  # the library's "unknown integration method" would deny it exists
        raise OptionError("--rule simpson refines adaptive steps only: add --steps auto, or pick a fixed-step rule (gausslegendre, trapezoid, riemann_*)")
    unused = [flag for flag, bad in given.items() if bad]
    if unused:
        hint = " (gradient_shap's baselines are --references)" if name == "gradient_shap" and "--baseline" in unused else ""
        hint += " (an LLM run's targets are each line's 'target' in the prompts file)" if name == "llm_integrated_gradients" else ""
        what = f"noise_tunnel over {base}" if name == "noise_tunnel" else name
        verb = "does" if len(unused) == 1 else "do"
        raise OptionError(f"{', '.join(unused)} {verb} not apply to --method {what} (it would be ignored){hint}: remove {'it' if len(unused) == 1 else 'them'}")


def _method_options(args: argparse.Namespace) -> dict:
    """The method's own options given on the command line (run() rejects those it does not take)."""
    opts = {
        "nt_type": args.nt_type, "nt_samples": args.nt_samples, "base_method": args.base_method, "seed": args.seed,
        "n_samples": args.n_samples, "references": args.references, "layer_reduce": args.layer_reduce, "lengths": args.lengths,
        "pool": args.pool, "channel_dim": args.channel_dim, "attribute_to_layer_input": True if args.layer_input else None,
        "layer": None if not args.layer else (args.layer[0] if len(args.layer) == 1 else list(args.layer)),
        "stdevs": None if args.stdevs is None else _floats(args.stdevs, "--stdevs"),
    }  # fmt: skip
    return {k: v for k, v in opts.items() if v is not None}


def _floats(value: str, flag: str) -> float | tuple[float, ...]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise OptionError(f"{flag} must be a number or comma-separated numbers (one per input), got {value!r}") from None
    return parts[0] if len(parts) == 1 else parts


def _data_mean(data: object, chunk: int = 1024) -> object:
    """The per-feature mean sample of the data (one streamed pass), as the baseline."""
    import torch

    from ..sources import open_source

    source = open_source(data)
    total, n = None, len(source)
    for start in range(0, n, chunk):
        xs, _ = source.read(start, min(n, start + chunk))
        sums = [x.double().sum(0) for x in xs]
        total = sums if total is None else [t + s for t, s in zip(total, sums)]
    means = [(t / n).to(torch.float32) for t in total]
    return means[0] if len(means) == 1 else tuple(means)
