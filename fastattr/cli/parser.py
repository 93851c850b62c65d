"""The command line's argparse parser: every subcommand, its flags and their value types."""

from __future__ import annotations

import argparse

from .. import __version__
from ..precision import POLICIES, PRECISIONS
from ..quadrature import RULES
from ..run_methods import METHOD_NAMES
from .commands import _demo, _run
from .reports import _audit, _info, _layers, _render, _verify

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


AUDIT_EXAMPLES = """examples:
  fastattr audit runs/ig --report audit/                      # attributions only: residuals, sparseness, maps
  fastattr audit runs/ig --compare runs/ig-bf16 --min-agreement 0.9 --report audit/
  fastattr demo --out runs/demo && fastattr audit runs/demo --model fastattr.demo:trained_model \\
               --data runs/demo/inputs.npy --masks runs/demo/masks.npy --require-randomization --report audit/
exit status: 0 all thresholds hold, 1 a threshold is violated (the report is still written), 2 bad input;
a check that no threshold requires (e.g. randomization without --require-randomization) and does not pass
is a WARNING, never a failure: one verdict, PASSED or FAILED, matching the exit status
"""


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
