"""The ``fastattr`` command line (also ``python -m fastattr``).

Exit status: 0 success; 1 a check failed (``verify`` finding a problem, ``audit`` a violated
threshold) or an unexpected exception, printed with its traceback since it is a bug (in fastattr or
in the model or data code it ran); 2 a deliberate fastattr error (every ``FastattrError``: bad input,
an unusable run directory, a failed peer...) or a bad argument, printed as one line (``--debug``
shows its traceback too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import unicodedata
from typing import Any

from . import __version__
from .errors import FastattrError, OptionError
from .precision import POLICIES, PRECISIONS
from .quadrature import RULES
from .run_methods import METHOD_NAMES

LLM_METHODS = ("llm_integrated_gradients", "llm_ig")

logger = logging.getLogger("fastattr")

RUN_EXAMPLES = """examples:
  fastattr run --model mypkg.models:resnet --model-arg depth=18 --data images.npy --out runs/ig
  fastattr run --model model.ts --data data.h5:images --labels data.h5:labels --target label \\
               --steps 32 --precision bf16 --storage-dtype float16 --out runs/ig-bf16
  fastattr run ... --baseline mean --out runs/ig-mean   # baseline: the data's mean sample
  fastattr run ... --out runs/ig            # rerun after a crash: resumes, each sample once
  fastattr run ... --steps auto --tolerance 0.01 --out runs/ig-auto   # per-sample steps to a completeness tolerance
  fastattr run ... --method smoothgrad --nt-samples 16 --stdevs 0.15 --seed 0 --out runs/sg
  fastattr run ... --method gradient_shap --references refs.npy --n-samples 32 --out runs/gs
  fastattr run --model hf:models/gpt2-small --data prompts.jsonl --steps 32 --baseline 1 --gen-arg max_new_tokens=16 \\
               --out runs/llm             # each line {"prompt": "...", "target": "..."}; no target: generated greedily
  fastattr run --model text:classifier --data text:tokens --forward-args-inputs 1 --method layer_ig --layer embed \\
               --layer-reduce sum --lengths mask --baseline 0 --out runs/tokens   # data factory returns (ids, mask)
"""


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(samples=args.samples, n_steps=args.steps, precision=args.precision, device=args.device, out=args.out)
    print("\n".join(report.lines()))
    return 0


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from .llm.text import DEFAULT_GEN_ARGS
    from .runner import run
    from .specs import HF_PREFIX, load_data, load_hf, load_model, parse_kv

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
    from .run_methods import ALIASES

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


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value!r}")
    return number


def _auto_or_positive_int(expected: str):  # noqa: ANN202 - an argparse type
    """An argparse type for 'auto' or a positive int; ``expected`` says so in the error."""

    def parse(value: str) -> int | str:
        if value == "auto":
            return value
        try:
            return _positive_int(value)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {value!r}") from None

    return parse


_steps = _auto_or_positive_int("a positive int or auto")
_batch_size = _auto_or_positive_int("auto or a positive int")


def _shape(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints like 3,224,224, got {value!r}") from None


def _index_range(value: str) -> tuple[int, int]:
    """START:STOP, :STOP, or START (one sample)."""
    start, _, stop = value.partition(":")
    try:
        first = int(start or 0)
        return first, int(stop) if stop else first + 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be START:STOP with ints, got {value!r}") from None


def _size(value: str) -> tuple[int, int]:
    width, _, height = value.partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT in pixels, got {value!r}") from None
    if min(size) < MIN_PIXELS:  # matplotlib cannot lay out a figure much smaller (a singular-matrix traceback at 0x0)
        raise argparse.ArgumentTypeError(f"must be at least {MIN_PIXELS}x{MIN_PIXELS} pixels, got {value!r}")
    return size


MIN_PIXELS = 100


def _data_mean(data: object, chunk: int = 1024) -> object:
    """The per-feature mean sample of the data (one streamed pass), as the baseline."""
    import torch

    from .sources import open_source

    source = open_source(data)
    total, n = None, len(source)
    for start in range(0, n, chunk):
        xs, _ = source.read(start, min(n, start + chunk))
        sums = [x.double().sum(0) for x in xs]
        total = sums if total is None else [t + s for t, s in zip(total, sums)]
    means = [(t / n).to(torch.float32) for t in total]
    return means[0] if len(means) == 1 else tuple(means)


def _info(args: argparse.Namespace) -> int:
    from .probe import describe as describe_probe
    from .store import open_run

    with open_run(args.dir, check_run=False) as store:  # what the manifest says; `fastattr verify` checks the shards are the run's
        meta = store.metadata
        size = sum(os.path.getsize(os.path.join(args.dir, s["file"])) for s in meta["shards"])
        if args.json:  # json.dumps escapes every control and non-ASCII character
            progress = [vars(p) for p in store.in_progress()]
            print(json.dumps({**meta, "samples": len(store), "bytes": size, "in_progress": progress}, indent=1, default=str))
            return 0
        cfg = meta  # the run config, flattened with status (complete / running / stopped), total and shards
        fp = cfg.get("fingerprints") or {}
        model_fp, data_fp = fp.get("model"), fp.get("data")
        if isinstance(model_fp, dict):  # parameters / modules / code digests
            model_line = ", ".join(f"{k} {str(v)[:12]}" for k, v in model_fp.items())
        else:
            model_line = f"sha256 {str(model_fp)[:16]}"
        if isinstance(data_fp, dict):  # the block hashes are in --json
            data_line = json.dumps({k: v for k, v in data_fp.items() if k != "blocks"})
        else:
            data_line = json.dumps(data_fp)
        lines = [
            f"run: {os.path.abspath(args.dir)}",
            f"status: {meta.get('status')}, {len(store)} of {meta.get('total')} samples, {len(meta['shards'])} shards, {size / 2**20:.1f} MiB",
        ]
        for p in store.in_progress():  # rows a writer appended but has not finalized: not counted above
            what = "being written" if meta.get("status") == "running" else "left unfinished by a stopped writer, recomputed on resume"
            lines.append(f"in progress: {p.rows} rows from sample {p.start} in {p.file} ({what})")
        if meta.get("status") == "stopped":
            lines.append("no writer is running: rerun the same command to resume")
        lines += [
            f"method: {cfg.get('method')} {json.dumps(_without_blocks(cfg.get('params', {})))}",
            f"precision: {cfg.get('precision')}, target: {json.dumps(cfg.get('target'))}, storage: {cfg.get('storage_dtype')} {_describe_compression(store, cfg)}"
            f", model mode: {'train' if cfg.get('train_mode') else 'eval'}",
            *([describe_probe(cfg["precision_probe"])] if isinstance(cfg.get("precision_probe"), dict) else []),
            *([_describe_reduction(cfg["channel_reduce"])] if isinstance(cfg.get("channel_reduce"), dict) else []),
            f"model: {model_line}",
            f"data: {data_line}",
            f"versions: {json.dumps(cfg.get('versions'))}; attributions: {', '.join(store.attribution_names)}",
        ]
    for line in lines:
        print(printable(line))
    return 0


def _without_blocks(value: Any) -> Any:
    """``value`` without the per-block hashes of its dataset descriptions (gradient_shap's
    references hold one per sample: a line as long as the reference set; they are in --json)."""
    if isinstance(value, dict):
        return {k: _without_blocks(v) for k, v in value.items() if k != "blocks"}
    if isinstance(value, list):
        return [_without_blocks(v) for v in value]
    return value


def _describe_compression(store: Any, cfg: dict) -> str:
    """The shards' filters as stored (a resume with another compression, or "auto", mixes them;
    the config keeps the last option given): "gzip", or "gzip (5 shards), lzf (3 shards)"."""
    try:
        kinds = store.compressions()
    except FastattrError:  # a damaged shard: info still prints what the manifest says (fastattr verify names it)
        return f"{cfg.get('compression')} (as configured; a shard could not be read)"
    if not kinds:
        return str(cfg.get("compression"))
    if len(kinds) == 1:
        return next(iter(kinds))
    return ", ".join(f"{k} ({n} shards)" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))


def _describe_reduction(red: dict) -> str:
    """The info line of a run stored channel-reduced (run(channel_reduce=))."""
    shapes = ", ".join(f"{tuple(a)} -> {tuple(b)}" for a, b in zip(red.get("input_shapes") or [], red.get("stored_shapes") or []))
    return f"channel-reduced: {red.get('mode')} over the channel dim, stored {shapes or '?'} per sample; stats and delta of the full attributions"


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (ESC as \\x1b, U+202E as \\u202e): a
    manifest is data, and its fields must not move the cursor, recolour or rewrite the terminal."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf") or ch in "\u2028\u2029":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _verify(args: argparse.Namespace) -> int:
    from .store import verify_run

    report = verify_run(args.dir, repair=args.repair)
    # the first line is the one verdict: OK, INCOMPLETE or FAILED; names and keys from the manifest and shards are data (escaped)
    print("\n".join(printable(line) for line in report.lines()))
    return report.exit_code


def _layers(args: argparse.Namespace) -> int:
    import torch

    from .layers import describe_layers, example_inputs
    from .specs import load_data, load_model, parse_kv

    if bool(args.input_shape) == bool(args.data):
        raise OptionError("give --input-shape (with --input-dtype/--vocab for token ids) or --data, not both or neither")
    if args.data and (args.input_dtype or args.vocab is not None):
        raise OptionError("--input-dtype and --vocab describe --input-shape's random inputs; with --data the data's own samples are used: remove them")
    model = load_model(args.model, parse_kv(args.model_arg), device=args.device)
    if args.data:  # the first two samples of the data, every input of a sample passed to the model
        from .sources import open_source

        source = open_source(load_data(args.data, parse_kv(args.data_arg)))
        inputs = [x.to(args.device) for x in source.read(0, min(2, len(source)))[0]]
    else:
        inputs = example_inputs(args.input_shape, args.input_dtype, args.vocab, device=args.device)
        if args.vocab is not None and all(x.is_floating_point() or x.dtype == torch.bool for x in inputs):
            raise OptionError("--vocab applies to integer inputs (token ids): add --input-dtype long, or remove --vocab")
    try:
        rows = describe_layers(model, inputs=inputs)
    except FastattrError:
        raise
    except Exception as exc:  # the model refused the example inputs: the shapes given here are wrong, not fastattr
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)
        first = str(exc).strip().split("\n")[0]
        fix = "check --input-shape, --input-dtype and --vocab" if not args.data else "check that --data is the model's data"
        raise OptionError(f"the model failed on example inputs {shapes} (batch of {len(inputs[0])}): {type(exc).__name__}: {first}; {fix} "
                          "(--debug shows the traceback)") from exc
    width = max(len(r.name) for r in rows)
    kind_width = max(len(r.kind) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.kind:<{kind_width}}  {r.output_shape:<24}  {r.parameters:>10,}")
    return 0


def _render(args: argparse.Namespace) -> int:
    import numpy as np

    from .render import RenderError, render_grid
    from .sources import open_source
    from .specs import load_data, load_tokenizer
    from .store import open_run

    start, stop = args.index
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise OptionError(f"--out {args.out}: no such directory {os.path.dirname(args.out)!r}; create it first")
    if not 0 <= args.percentile <= 100:
        raise OptionError(f"--percentile must be in [0, 100], got {args.percentile:g}")
    with open_run(args.dir) as store:
        if not start < min(stop, store.total):  # the store clips a range to the run: say so instead of "no samples"
            raise RenderError(f"--index {start}:{stop} selects no sample of {args.dir}, which has samples 0:{store.total}")
        try:
            batch = store[start:stop]
        except KeyError as exc:  # a stopped or running run: some samples of the range are not stored yet
            raise RenderError(f"{exc.args[0]}; pick a stored --index range (fastattr info {args.dir} shows progress)") from None
        if store.metadata.get("method") == "llm_integrated_gradients":  # token-by-token heatmaps, labelled
            from .llm.render import render_llm

            tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
            render_llm(batch, args.out, tokenizer=tokenizer, percentile=args.percentile, size=args.size)
            print(f"wrote {args.out} ({len(batch['index'])} samples, {args.size[0]}x{args.size[1]} pixels)")
            return 0
        name = args.name or store.attribution_names[0]
        if name not in store.attribution_names:
            raise RenderError(f"--name {name!r}: {args.dir} has no such attribution; it stores {', '.join(map(repr, store.attribution_names))}")
        attributions = batch["attributions"][name]
        image = True if store.channel_reduce is not None and attributions.ndim == 3 else None  # channel-reduced (H, W) maps of any size
        titles = [f"#{i} target {t}" for i, t in zip(batch["index"], batch["target"].tolist())]
    inputs = None
    if args.data:
        source = open_source(load_data(args.data))
        index = np.asarray(batch["index"])
        if len(source) <= int(index[-1]):
            raise RenderError(f"--data {args.data} holds {len(source)} samples; the run's sample {int(index[-1])} needs more: give the run's data")
        inputs = source.read(int(index[0]), int(index[-1]) + 1)[0][0].numpy()[index - index[0]]
    width, height = args.size
    render_grid(attributions, args.out, inputs=inputs, titles=titles, percentile=args.percentile, size=(width, height), image=image)
    print(f"wrote {args.out} ({len(attributions)} samples, {width}x{height} pixels)")
    return 0


AUDIT_EXAMPLES = """examples:
  fastattr audit runs/ig --report audit/                      # attributions only: residuals, sparseness, maps
  fastattr audit runs/ig --compare runs/ig-bf16 --min-agreement 0.9 --report audit/
  fastattr demo --out runs/demo && fastattr audit runs/demo --model fastattr.demo:trained_model \\
               --data runs/demo/inputs.npy --masks runs/demo/masks.npy --require-randomization --report audit/
exit status: 0 all thresholds hold, 1 a threshold is violated (the report is still written), 2 bad input;
a check that no threshold requires (e.g. randomization without --require-randomization) and does not pass
is a WARNING, never a failure: one verdict, PASSED or FAILED, matching the exit status
"""


def _audit(args: argparse.Namespace) -> int:
    from .audit import audit_run, require_matplotlib, summary_lines, write_report
    from .specs import load_data, load_model, parse_kv

    require_matplotlib()  # the report's plots: fail before any audit work
    for flag, path in (("--compare", args.compare), ("--masks", args.masks)):
        if path and not os.path.exists(path):  # checked before the model factory runs (it may train or download)
            raise OptionError(f"{flag}: no such file or directory: {path}")
    model = load_model(args.model, parse_kv(args.model_arg), device=args.device) if args.model else None
    data = load_data(args.data, parse_kv(args.data_arg)) if args.data else None
    thresholds = {
        "max_residual": args.max_residual, "max_rel_residual": args.max_rel_residual, "max_nonfinite": args.max_nonfinite,
        "min_agreement": args.min_agreement, "min_topk_overlap": args.min_topk_overlap, "min_mass_inside": args.min_mass_inside,
        "require_beats_random": args.require_beats_random, "require_randomization": args.require_randomization,
    }  # fmt: skip
    result = audit_run(
        args.dir, model=model, data=data, compare=args.compare, masks=args.masks, name=args.name, sample=args.sample,
        batch_size=args.batch_size, top_k=args.top_k, steps=args.steps, replacement=args.replacement,
        replacement_value=args.replacement_value, blur_sigma=args.blur_sigma, score=args.score, randomization=args.randomization,
        randomization_sample=args.randomization_sample, max_similarity=args.max_similarity, thresholds=thresholds, seed=args.seed,
    )  # fmt: skip
    paths = write_report(result, args.report)
    if not args.quiet or not result.passed:
        print("\n".join(summary_lines(result)))
        print(f"report: {paths['markdown']} (every number and its definition: {paths['json']})")
    return 0 if result.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastattr", description="Fast, Captum-compatible batch attribution for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastattr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and debug details")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    # the same flags after the command (`fastattr run ... -q`); SUPPRESS keeps the value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress and debug details")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    demo = sub.add_parser("demo", parents=[common], help="train a small CNN on synthetic data with known answers and attribute it")
    demo.add_argument("--samples", type=_positive_int, default=2000, help="test samples to attribute (default 2000)")
    demo.add_argument("--steps", type=_positive_int, default=32, help="integrated-gradients steps (default 32)")
    demo.add_argument("--precision", choices=PRECISIONS, default="fp32")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--out", default=None, help="run directory for the shards (default: a new temporary directory)")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", parents=[common], help="attribute a whole dataset into HDF5 shards (resumable)", epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True, help="package.module:factory, a TorchScript file, a torch.export .pt2 file, or hf:DIR (a local Hugging Face causal LM + tokenizer)")
    run.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the model factory (repeatable)")
    run.add_argument("--data", required=True, help="file.npy, file.h5:dataset, prompts.jsonl (LLM runs) or package.module:factory")
    run.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the data factory (repeatable)")
    run.add_argument("--labels", default=None, help="labels as file.npy or file.h5:dataset (for --target label)")
    run.add_argument("--out", required=True, help="run directory")
    run.add_argument("--method", default=None, choices=list(METHOD_NAMES), help="attribution method (default ig; llm_integrated_gradients for --model hf:DIR)")
    run.add_argument("--steps", type=_steps, default=None, help="integration steps: an int (default 50) or auto (per-sample, to --tolerance)")
    run.add_argument("--tolerance", type=float, default=None, help="with --steps auto: |delta| <= tolerance * |F(x) - F(x0)| per sample (default 0.01)")
    run.add_argument("--max-steps", type=_positive_int, default=None, help="with --steps auto: the per-sample cap (default 257)")
    run.add_argument("--rule", default=None, choices=[*RULES, "simpson"], help="integration rule (default gausslegendre; with --steps auto: simpson, or trapezoid / gausslegendre)")
    fam = run.add_argument_group("noise_tunnel (smoothgrad) and gradient_shap (expected_gradients)")
    fam.add_argument("--nt-type", default=None, choices=["smoothgrad", "smoothgrad_sq", "vargrad"], help="noise_tunnel: how copies combine (default smoothgrad)")
    fam.add_argument("--nt-samples", type=_positive_int, default=None, help="noise_tunnel: noisy copies per sample (default 5)")
    fam.add_argument("--base-method", default=None, choices=["ig", "integrated_gradients", "saliency", "input_x_gradient"], help="noise_tunnel: the method run on each copy (default ig)")
    fam.add_argument("--stdevs", default=None, help="noise standard deviation, or one per input comma-separated (noise_tunnel default 1.0, gradient_shap 0.0)")
    fam.add_argument("--references", default=None, help="gradient_shap: reference samples, file.npy or file.h5:dataset")
    fam.add_argument("--n-samples", type=_positive_int, default=None, help="gradient_shap: random points per sample (default 5)")
    fam.add_argument("--seed", type=int, default=None, help="noise_tunnel / gradient_shap: seed of the draws, recorded in the run (default 0)")
    lay = run.add_argument_group("layer_integrated_gradients (layer_ig) and activations")
    lay.add_argument("--layer", action="append", default=[], metavar="NAME", help="qualified layer name (see `fastattr layers`); repeat for several")
    lay.add_argument("--layer-input", action="store_true", help="attribute to / capture the layer's input instead of its output")
    lay.add_argument("--layer-reduce", default=None, choices=["sum", "l2", "abs"], help="layer_ig: store the last dim reduced (per-token attributions); default: the full tensor")
    lay.add_argument("--pool", default=None, choices=["mean", "max", "sum", "l2"], help="activations: one value per channel (default: the full activation)")
    lay.add_argument("--channel-dim", type=int, default=None, help="activations: the channel dim for --pool (default 1; -1 for (B, T, D) token models)")
    lay.add_argument("--lengths", default=None, choices=["mask"], help="store extras/lengths: real tokens per padded row, from the attention mask (the first forward-arg input)")
    gen = run.add_argument_group("llm_integrated_gradients (llm_ig): prompts.jsonl with 'prompt' and optional 'target' per line")
    gen.add_argument("--gen-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="generation argument for prompts without a target, over Captum's defaults (max_new_tokens=25, greedy); repeatable")
    gen.add_argument("--seq-only", action="store_true", help="store seq_attr alone (one backward per step instead of one per generated token)")
    gen.add_argument("--padding-side", default="right", choices=["left", "right"], help="how prompts of a batch are padded (default right)")
    run.add_argument("--forward-args-inputs", type=int, default=0, metavar="K",
                     help="the last K inputs of each sample go to the model as forward args, not attributed (e.g. an attention mask)")
    run.add_argument("--precision", default="fp32", choices=POLICIES,
                     help="fp32 (default), tf32, bf16, fp16, or auto: the fastest whose probe error vs fp32 is within --precision-tolerance")
    run.add_argument("--precision-tolerance", type=float, default=0.01, help="precision auto: largest probe error (relative L2) accepted (default 0.01)")
    run.add_argument("--precision-warn", type=float, default=0.01, help="warn when the probe error exceeds this (default 0.01)")
    run.add_argument("--target", default=None, help="predicted (default), label, an int, or file.npy")
    run.add_argument("--baseline", default=None, help="zeros (default), mean (of the data), a number, or file.npy (one sample, or one per sample)")
    run.add_argument("--batch-size", type=_batch_size, default="auto", help="the most rows per forward: auto (default) or an int (on CPU one above 32 bounds the throughput tuner)")
    run.add_argument("--memory-budget", default=None,
                     help="memory for one chunk's rows, e.g. 8GiB: on CUDA device memory (default: half of free), on CPU host "
                          "memory bounding the tuned rows (default: half of available)")
    run.add_argument("--channel-reduce", default=None, choices=["sum", "abs", "l2"],
                     help="store each (C, H, W) input attribution as one (H, W) map: the channels' sum, sum of |a| or L2 norm "
                          "(stats and delta stay those of the full attributions)")
    run.add_argument("--storage-dtype", default="float32", choices=["float32", "float16"],
                     help="float16 halves the bytes (cast on the device); values beyond 65504 are stored as inf and counted in stats/nonfinite")
    run.add_argument("--compression", default="auto", choices=["auto", "lzf", "gzip", "none"],
                     help="auto (default): each shard gzip (shuffle + deflate, encoded on every core) where that shrinks it at least 1.5x, else none")
    run.add_argument("--shard-size", type=_positive_int, default=4096, help="samples per shard (default 4096)")
    run.add_argument("--shard-seconds", type=float, default=60.0, help="also finalize a shard once it is this old, bounding what a crash can lose (default 60; 0: no time limit)")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    run.add_argument("--resume", action="store_true", default=True, help="continue an existing run in --out (the default)")
    run.add_argument("--overwrite", action="store_true", help="discard an existing run in --out instead of resuming it")
    run.add_argument("--allow-other-files", action="store_true",
                     help="write the run into a directory that holds other files (fastattr never touches them)")
    run.add_argument("--allow-nonfinite", action="store_true",
                     help="store samples whose inputs, outputs or attributions hold NaN/inf (counted in stats/nonfinite) instead of stopping")
    run.add_argument("--train-mode", action="store_true",
                     help="run the model in train mode (BatchNorm batch statistics, dropout); default: eval mode. Modes and buffers are restored")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model's forward for the engine's chunks (off by default: slower on the CPUs measured)")
    run.set_defaults(func=_run)

    info = sub.add_parser("info", parents=[common], help="what a run directory holds: config, provenance, progress, size")
    info.add_argument("dir")
    info.add_argument("--json", action="store_true", help="print the manifest and totals as JSON")
    info.set_defaults(func=_info)

    verify = sub.add_parser("verify", parents=[common], help="check checksums, schema, coverage, non-finite values and residuals (exit 0 only if all hold)")
    verify.add_argument("dir")
    verify.add_argument(
        "--repair", action="store_true",
        help="first drop damaged shards from the manifest (kept as <name>.corrupt), so that rerunning the same `fastattr run` recomputes their samples",
    )  # fmt: skip
    verify.set_defaults(func=_verify)

    layers = sub.add_parser("layers", parents=[common], help="a model's named modules and their output shapes (to pick a layer)")
    layers.add_argument("model", help="package.module:factory, a TorchScript file or a .pt2 file")
    layers.add_argument("--input-shape", action="append", default=[], type=_shape, metavar="C,H,W", help="one sample's shape per input (repeat for several inputs)")
    layers.add_argument("--input-dtype", action="append", default=[], metavar="DTYPE", help="torch dtype per input (or one for all): float32 (default), long for token ids, bool")
    layers.add_argument("--vocab", type=int, default=None, help="integer inputs are random token ids in [0, VOCAB)")
    layers.add_argument("--data", default=None, help="describe with the first samples of this data instead (file.npy, file.h5:dataset, package.module:factory)")
    layers.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the data factory (repeatable)")
    layers.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    layers.add_argument("--device", default="cpu")
    layers.set_defaults(func=_layers)

    render = sub.add_parser("render", parents=[common], help="heatmaps (images) or bar charts (vectors, tokens) of stored attributions as a PNG")
    render.add_argument("dir")
    render.add_argument("--index", type=_index_range, default="0:16", help="global sample range START:STOP (default 0:16)")
    render.add_argument("--out", required=True, help="PNG file to write")
    render.add_argument("--data", default=None, help="the run's data (file.npy, file.h5:dataset) to draw images under the heatmaps")
    render.add_argument("--name", default=None, help="attribution name (default: the first, e.g. x)")
    render.add_argument("--percentile", type=float, default=99.0, help="clip colours at this percentile of |attribution| (default 99)")
    render.add_argument("--tokenizer", default=None, metavar="DIR", help="LLM runs: label the heatmap with this local Hugging Face tokenizer (hf:DIR or DIR; default: token ids)")
    render.add_argument("--size", type=_size, default="1200x900", help="image size in pixels, WIDTHxHEIGHT (default 1200x900)")
    render.set_defaults(func=_render)

    audit = sub.add_parser("audit", parents=[common], help="audit stored attributions and write a report (exit 1 when a threshold is violated)", epilog=AUDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    audit.add_argument("dir")
    audit.add_argument("--report", required=True, help="directory for audit.json, report.md, class_maps.npz and the PNG plots")
    audit.add_argument("--model", default=None, help="the run's model (enables deletion/insertion and the randomization check); needs --data")
    audit.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the model factory (repeatable)")
    audit.add_argument("--data", default=None, help="the run's data: file.npy, file.h5:dataset or package.module:factory")
    audit.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the data factory (repeatable)")
    audit.add_argument("--compare", default=None, metavar="DIR2", help="a second run of the same data: per-sample agreement")
    audit.add_argument("--masks", default=None, help="ground-truth masks as .npy, one per sample (localization)")
    audit.add_argument("--name", default=None, help="attribution to audit (default: the first, e.g. x)")
    audit.add_argument("--sample", type=int, default=256, help="samples for deletion/insertion, drawn at random with --seed (default 256)")
    audit.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    audit.add_argument("--replacement", choices=["baseline", "blur"], default="baseline", help="what replaces deleted features (default: a constant baseline)")
    audit.add_argument("--replacement-value", type=float, default=0.0, help="the baseline value (default 0)")
    audit.add_argument("--blur-sigma", type=float, default=2.0, help="Gaussian blur sigma in pixels for --replacement blur (default 2)")
    audit.add_argument("--score", choices=["softmax", "logit"], default="softmax", help="model score on the curves (default softmax probability)")
    audit.add_argument("--randomization", choices=["auto", "cascade", "all", "none"], default="auto",
                       help="parameter randomization check: auto (default) is cascade where the run's method can be rebuilt from its "
                            "manifest, else skipped with a warning (GradientShap references, array baselines)")
    audit.add_argument("--randomization-sample", type=int, default=64, help="samples re-attributed per randomization step (default 64)")
    audit.add_argument("--max-similarity", type=float, default=0.5, help="randomization passes when similarity falls below this (default 0.5)")
    audit.add_argument("--top-k", type=int, default=None, help="k for top-k overlap (default 10%% of the features)")
    audit.add_argument("--batch-size", type=int, default=256, help="samples read per batch (default 256)")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    gate = audit.add_argument_group("thresholds (exit 1 when one is violated)")
    gate.add_argument("--max-residual", type=float, default=None, help="largest absolute completeness residual (a non-finite residual always violates it)")
    gate.add_argument("--max-rel-residual", type=float, default=None, help="median relative completeness residual (a non-finite residual always violates it)")
    gate.add_argument("--max-nonfinite", type=int, default=None, help="non-finite values stored: attribution values plus non-finite outputs, baseline outputs and deltas")
    gate.add_argument("--min-agreement", type=float, default=None, help="mean Spearman correlation with --compare")
    gate.add_argument("--min-topk-overlap", type=float, default=None, help="mean top-k overlap with --compare")
    gate.add_argument("--min-mass-inside", type=float, default=None, help="mean attribution mass inside --masks")
    gate.add_argument("--require-beats-random", action="store_true", help="deletion and insertion must beat the random-order control")
    gate.add_argument("--require-randomization", action="store_true", help="the randomization check must pass")
    audit.set_defaults(func=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("run", "audit") and args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "device", None) is not None:
        try:
            _check_device(args.device)
        except OptionError as exc:  # before any model is loaded: one line, exit 2
            print(f"fastattr: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "run" and "LOCAL_RANK" in os.environ and args.device.startswith("cuda"):
        import torch

        from .distributed import local_device

        args.device = str(local_device(torch.device(args.device)))  # torchrun: one GPU per rank, loaded there
    from .interrupts import exit_code, two_stage_interrupts

    saving = args.command in ("run", "demo")  # commands that write shards
    first = "fastattr: interrupted: " + ("saving the shard in progress, then stopping" if saving else "stopping") + " (Ctrl-C again quits at once)"
    again = "fastattr: interrupted again: quitting now" + (" (finished shards are kept; rerun to resume)" if saving else "")
    try:
        with two_stage_interrupts(first, again):  # a second Ctrl-C exits at once, never hangs (fastattr/interrupts.py)
            return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (interrupts.Terminated: exit 143)
        print("fastattr: interrupted (finished shards are kept; rerun to resume)", file=sys.stderr)
        return exit_code(exc)
    except BrokenPipeError:  # `fastattr info run | head`: the reader left; not an error of ours
        # Python flushes stdout again at exit and would report the broken pipe: point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except FastattrError as exc:  # a deliberate error: one line that says what to do
        _record_for_torchrun(exc)
        if args.debug:
            raise
        text = _flag_words(str(exc)) if args.command == "run" else str(exc)
        print("\n".join(printable(line) for line in f"fastattr: error{_rank()}: {text}".split("\n")), file=sys.stderr)  # may quote a manifest
        return 2
    except Exception as exc:  # anything else is a bug (here or in the model/data code): keep the traceback
        _record_for_torchrun(exc)
        traceback.print_exc()
        print(f"fastattr: unexpected {type(exc).__name__}{_rank()} (traceback above; not a fastattr input error)", file=sys.stderr)
        return 1


def _check_device(name: str) -> None:
    """--device names a device this machine has (a CPU-only torch given --device cuda fails with an
    AssertionError deep in the model's .to(), and a typo with torch's RuntimeError)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {name} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: no CUDA device is available to this torch ({torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {name}: MPS is not available here; use --device cpu")


# keyword arguments that library errors name, and the flags a command-line user types instead
_FLAG_WORDS = {"pass overwrite=True": "pass --overwrite", "pass allow_nonfinite=True to proceed": "pass --allow-nonfinite to proceed",
               "train_mode=True cannot": "--train-mode cannot", "this method needs layer=:": "this method needs --layer NAME:"}  # fmt: skip


def _flag_words(text: str) -> str:
    for words, flag in _FLAG_WORDS.items():
        text = text.replace(words, flag)
    return text


def _rank() -> str:
    """Under torchrun, which rank speaks."""
    return f" (rank {os.environ.get('RANK')})" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""


def _record_for_torchrun(exc: BaseException) -> None:
    """Under torchrun, write the error where its agent looks (torch.distributed.elastic's error
    file, as its @record decorator does), so the job's failure report shows this rank's error."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        from .errors import PeerFailedError

        get_error_handler().record_exception(exc)
        if isinstance(exc, PeerFailedError):
            # The report's root cause is the smallest timestamp in whole seconds, ties going to the
            # lowest rank: a rank stopped by another's failure would often be named instead of it.
            path = os.environ["TORCHELASTIC_ERROR_FILE"]
            with open(path) as fp:
                data = json.load(fp)
            data["message"]["extraInfo"]["timestamp"] = str(int(data["message"]["extraInfo"]["timestamp"]) + 1)
            with open(path, "w") as fp:
                json.dump(data, fp)
    except Exception as record_exc:  # reporting must never hide the error itself
        logger.debug("could not record the error for torchrun: %s", record_exc)


if __name__ == "__main__":
    sys.exit(main())
