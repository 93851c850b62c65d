"""`fastattr info`, `verify`, `layers`, `render` and `audit`: reading runs and reporting on them."""

from __future__ import annotations

import argparse
import json
import os
import unicodedata
from typing import Any

from ..errors import FastattrError, OptionError


def _info(args: argparse.Namespace) -> int:
    from ..probe import describe as describe_probe
    from ..store import open_run

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
    from ..store import verify_run

    report = verify_run(args.dir, repair=args.repair)
    # the first line is the one verdict: OK, INCOMPLETE or FAILED; names and keys from the manifest and shards are data (escaped)
    print("\n".join(printable(line) for line in report.lines()))
    return report.exit_code


def _layers(args: argparse.Namespace) -> int:
    import torch

    from ..layers import describe_layers, example_inputs
    from ..specs import load_data, load_model, parse_kv

    if bool(args.input_shape) == bool(args.data):
        raise OptionError("give --input-shape (with --input-dtype/--vocab for token ids) or --data, not both or neither")
    if args.data and (args.input_dtype or args.vocab is not None):
        raise OptionError("--input-dtype and --vocab describe --input-shape's random inputs; with --data the data's own samples are used: remove them")
    model = load_model(args.model, parse_kv(args.model_arg), device=args.device)
    if args.data:  # the first two samples of the data, every input of a sample passed to the model
        from ..sources import open_source

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

    from ..render import RenderError, render_grid
    from ..sources import open_source
    from ..specs import load_data, load_tokenizer
    from ..store import open_run

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
            from ..llm.render import render_llm

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


def _audit(args: argparse.Namespace) -> int:
    from ..audit import audit_run, require_matplotlib, summary_lines, write_report
    from ..specs import load_data, load_model, parse_kv

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
