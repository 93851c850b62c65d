"""``audit_run``: check every option, open the runs, stream the attribution-only metrics, run the
model-based checks on a sample, and decide the verdict."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import AuditError
from ..store import RunReader, open_run
from .definitions import (
    DEFAULT_MAX_SIMILARITY,
    DEFINITIONS,
    THRESHOLDS,
    AttributeFn,
    defines_delta,
    defines_output,
    is_padded,
)
from .model_checks import model_checks
from .randomization import method_from_run, reduced_like_run
from .streaming import StreamingAudit
from .verdict import AuditResult, audit_warnings, check_thresholds

__all__ = ["audit_run"]


def _covered(reader: RunReader) -> list[tuple[int, int]]:
    return [(s["start"], s["stop"]) for s in reader.metadata["shards"]]


def _check_covers(a: RunReader, b: RunReader) -> None:
    """Every sample stored in a must be stored in b (compared by global index)."""
    theirs = sorted(_covered(b))
    for start, stop in _covered(a):
        pos = start
        for s, e in theirs:
            if s <= pos < e:
                pos = e
            if pos >= stop:
                break
        if pos < stop:
            raise AuditError(f"the compared run {b.run_dir} does not store samples [{pos}, {stop}) that {a.run_dir} holds")


def _load_masks(masks: Any, total: int, feature_shape: tuple[int, ...], reduced: bool = False) -> tuple[np.ndarray, bool]:
    """The masks (memory-mapped if a .npy) and whether they carry a channel dim to reduce: a
    channel-reduced run (reduced=True) stores (H, W) maps and accepts (C, H, W) masks of its inputs."""
    if isinstance(masks, (str, os.PathLike)):
        path = str(masks)
        if not os.path.isfile(path) or not path.endswith(".npy"):
            raise AuditError(f"masks must be a .npy file; no such file: {path}")
        try:
            masks = np.load(path, mmap_mode="r")
        except ValueError as exc:  # an object array (a pickle) or not a .npy file: masks are never unpickled
            raise AuditError(f"masks {path}: {str(exc).rstrip('.')}; save them as a boolean array with np.save") from None
    # Memory-mapped masks stay on disk: only each batch's rows are read.
    m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else masks if isinstance(masks, np.ndarray) else np.asarray(masks)
    if m.ndim < 2 or not (m.dtype == bool or np.issubdtype(m.dtype, np.number)):
        raise AuditError(f"masks must be a boolean (or numeric) array with one map per sample, shape (N, *map); got shape {m.shape}, dtype {m.dtype}")
    if m.shape[0] < total:
        raise AuditError(f"masks hold {m.shape[0]} samples; the run has {total}")
    def fits(shape: tuple[int, ...]) -> bool:
        try:
            return np.broadcast_shapes(shape, feature_shape) == feature_shape
        except ValueError:
            return False

    if fits(m.shape[1:]):
        return m, False
    if reduced and m.ndim == len(feature_shape) + 2 and fits(m.shape[2:]):
        return m, True
    raise AuditError(f"a mask has shape {m.shape[1:]}, which does not broadcast to the attribution's {feature_shape}"
                     f"{' (the run is channel-reduced; (C, *shape) masks are accepted too)' if reduced else ''}")


# the values a threshold can meet at all: one outside them would fail (or pass) every audit whatever it measured
_RANGES = {"max_residual": (0.0, np.inf, "an absolute residual, >= 0"), "max_rel_residual": (0.0, np.inf, "a relative residual, >= 0"),
           "max_nonfinite": (0, np.inf, "a count of values, >= 0"), "min_agreement": (-1.0, 1.0, "a Spearman correlation, in [-1, 1]"),
           "min_topk_overlap": (0.0, 1.0, "a share of the top-k features, in [0, 1]"),
           "min_mass_inside": (0.0, 1.0, "a share of the attribution mass, in [0, 1]")}  # fmt: skip


def _check_threshold_ranges(thresholds: Mapping[str, Any]) -> None:
    for key, (lo, hi, what) in _RANGES.items():
        v = thresholds.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not lo <= v <= hi:
            flag = "--" + key.replace("_", "-")
            raise AuditError(f"{key} ({flag}) is {what}; got {v!r}")


def _check_same_data(reader: RunReader, source: Any) -> None:
    """The data given for the model-based checks is the data the run attributed (its recorded
    fingerprint, fastattr/fingerprints.py): other data would score the stored attributions against
    samples they do not belong to, and every check would measure nothing."""
    from ..fingerprints import _hash_rows

    recorded = (reader.metadata.get("fingerprints") or {}).get("data")
    if not isinstance(recorded, dict) or [list(s) for s in source.sample_shapes] != recorded.get("shapes"):
        return  # no fingerprint to compare (an old run); shapes are checked by the caller
    blocks = recorded.get("blocks")
    if recorded.get("kind") == "full" and isinstance(blocks, dict):
        differ = [key for key, digest in blocks.items() if _hash_rows(source, *map(int, key.split(":")))[0] != digest]
    elif recorded.get("count") == len(source) and recorded.get("labels") == source.has_labels and "sample_sha256" in recorded:
        differ = [] if source.fingerprint().get("sample_sha256") == recorded["sample_sha256"] else ["a strided sample"]
    else:
        return
    if differ:
        where = f"samples {', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}" if differ[0] != "a strided sample" else differ[0]
        raise AuditError(f"the data is not the data {reader.run_dir} attributed ({where} differ from its recorded fingerprint): "
                         "give the run's own data (the --data of `fastattr run`)")


def _same_model(reader: RunReader, model: torch.nn.Module) -> bool | None:
    """Whether the model's parameters and buffers are the run's (its recorded digest); None where
    the run recorded none. Another model's checks measure that model, not the run's attributions."""
    from ..fingerprints import model_fingerprint

    recorded = (reader.metadata.get("fingerprints") or {}).get("model")
    if not isinstance(recorded, dict) or "parameters" not in recorded:
        return None
    return model_fingerprint(model)["parameters"] == recorded["parameters"]


def audit_run(
    run: str | os.PathLike[str] | RunReader,
    *,
    model: torch.nn.Module | None = None,
    data: Any = None,
    compare: str | os.PathLike[str] | RunReader | None = None,
    masks: Any = None,
    name: str | None = None,
    sample: int = 256,
    batch_size: int = 256,
    top_k: int | None = None,
    steps: int = 20,
    replacement: str = "baseline",
    replacement_value: float = 0.0,
    blur_sigma: float = 2.0,
    score: str = "softmax",
    randomization: str = "cascade",
    randomization_sample: int = 64,
    max_similarity: float = DEFAULT_MAX_SIMILARITY,
    attribute_fn: AttributeFn | None = None,
    max_rows: int = 2048,
    max_class_maps: int = 64,
    thresholds: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> AuditResult:
    """Audit a run directory (or an open RunReader).

    Attribution-only metrics stream over every stored sample. With ``model`` and ``data`` (the
    run's data, aligned by global index), deletion/insertion runs on ``sample`` samples drawn at
    random (fixed ``seed``) and the randomization check ("cascade", "all" or "none"; "auto": cascade
    where the run's method can be rebuilt from its manifest, else skipped with a warning) on the first
    ``randomization_sample`` of them. ``compare``: a second run for agreement; ``masks``: (N, ...)
    booleans (array or .npy) for localization. Every option is checked before any work.
    """
    from ..sources import open_source

    thresholds = dict(thresholds or {})
    unknown = set(thresholds) - set(THRESHOLDS)
    if unknown:
        raise AuditError(f"unknown thresholds {sorted(unknown)}; known: {', '.join(THRESHOLDS)}")
    if replacement not in ("baseline", "blur"):
        raise AuditError(f"replacement must be 'baseline' or 'blur', got {replacement!r}")
    if score not in ("softmax", "logit"):
        raise AuditError(f"score must be 'softmax' or 'logit', got {score!r}")
    if randomization not in ("auto", "cascade", "all", "none"):
        raise AuditError(f"randomization must be 'auto', 'cascade', 'all' or 'none', got {randomization!r}")
    skipped = None  # why an "auto" randomization check did not run
    for label, v in (("sample", sample), ("batch_size", batch_size), ("steps", steps), ("randomization_sample", randomization_sample), ("max_rows", max_rows)):
        if not isinstance(v, int) or v < 1:
            raise AuditError(f"{label} must be a positive int, got {v!r}")
    _check_threshold_ranges(thresholds)
    if blur_sigma <= 0:
        raise AuditError(f"blur_sigma must be > 0, got {blur_sigma}")
    if model is None and data is not None:
        raise AuditError("model-based checks need both the model and the run's data (--model and --data; got only the data)")
    needs_model = {"require_beats_random", "require_randomization"} & {k for k, v in thresholds.items() if v}
    if needs_model and model is None:
        flags = ", ".join(f"{k} (--{k.replace('_', '-')})" for k in sorted(needs_model))
        raise AuditError(f"thresholds {flags} need the model and the run's data (--model and --data)")
    if thresholds.get("min_agreement") is not None or thresholds.get("min_topk_overlap") is not None:
        if compare is None:
            raise AuditError("agreement thresholds (--min-agreement, --min-topk-overlap) need a run to compare with (--compare DIR2)")
    if thresholds.get("min_mass_inside") is not None and masks is None:
        raise AuditError("min_mass_inside (--min-mass-inside) needs ground-truth masks (--masks masks.npy)")

    reader = run if isinstance(run, RunReader) else open_run(run)
    other = compare if isinstance(compare, RunReader) or compare is None else open_run(compare)
    try:
        if len(reader) == 0:
            raise AuditError(f"{reader.run_dir} stores no samples")
        name = name or reader.attribution_names[0]
        if name not in reader.attribution_names:
            raise AuditError(f"no attribution {name!r} in {reader.run_dir}; it stores {', '.join(reader.attribution_names)}")
        first = reader[int(reader.metadata["shards"][0]["start"])]
        feature_shape = tuple(first["attributions"][name].shape)
        if other is not None:
            if name not in other.attribution_names:
                raise AuditError(f"the compared run {other.run_dir} has no attribution {name!r}; it stores {', '.join(other.attribution_names)}")
            if len(other) == 0:
                raise AuditError(f"the compared run {other.run_dir} stores no samples")
            theirs = tuple(other[int(other.metadata["shards"][0]["start"])]["attributions"][name].shape)
            if theirs != feature_shape:
                raise AuditError(f"attribution {name!r} has shape {feature_shape} in {reader.run_dir} but {theirs} in {other.run_dir}")
            _check_covers(reader, other)
        reduction = reader.channel_reduce  # (C, H, W) inputs stored as (H, W) maps: masks and checks per pixel
        mask_arr, per_channel = _load_masks(masks, reader.total, feature_shape, reduction is not None) if masks is not None else (None, False)
        source = None
        llm = reader.metadata.get("method") == "llm_integrated_gradients"  # stores its own prompts and targets
        if llm and data is not None:
            raise AuditError("an LLM run stores its prompts and targets: give the model alone (no data)")
        if model is not None and data is None and not llm:
            raise AuditError("model-based checks need both the model and the run's data (--model and --data; got only the model)")
        if model is not None and not llm:
            source = open_source(data)
            if len(source) < reader.total:
                raise AuditError(f"the data holds {len(source)} samples; the run was made from {reader.total}")
            if len(source.sample_shapes) != 1:
                raise AuditError(f"model-based checks support single-input models; the data has {len(source.sample_shapes)} inputs")
            expected = tuple(source.sample_shapes[0])[1:] if reduction is not None else tuple(source.sample_shapes[0])
            if expected != feature_shape:
                raise AuditError(f"attribution {name!r} has shape {feature_shape} but the data's samples have {source.sample_shapes[0]}"
                                 f"{' (channel-reduced: ' + str(expected) + ')' if reduction is not None else ''}: model-based checks need input attributions")
            _check_same_data(reader, source)
            if replacement == "blur" and len(feature_shape) < 2:
                raise AuditError(f"replacement 'blur' needs samples with two spatial dimensions; they have shape {feature_shape}")
            if randomization != "none" and attribute_fn is None:
                try:
                    attribute_fn = method_from_run(reader.metadata)
                except AuditError as exc:
                    if randomization != "auto" or thresholds.get("require_randomization"):
                        raise
                    randomization, skipped = "none", str(exc).split("; pass attribute_fn=")[0]
            if randomization != "none" and reduction is not None:
                attribute_fn = reduced_like_run(attribute_fn, reduction["mode"])

        # 1. attribution-only metrics, streamed.
        meta = reader.metadata
        acc = StreamingAudit(name, feature_shape, top_k=top_k, max_class_maps=max_class_maps, seed=seed, defines_delta=defines_delta(meta),
                             defines_output=defines_output(meta), padded=is_padded(meta, first["extras"]))  # fmt: skip
        for batch in reader.iter_batches(batch_size):
            idx = batch["index"]
            lo, hi = int(idx[0]), int(idx[-1]) + 1  # a batch is contiguous: it never spans shards
            theirs_b = other[lo:hi] if other is not None else None
            mb = np.asarray(mask_arr[lo:hi]) if mask_arr is not None else None
            mb = mb.any(1) if per_channel and mb is not None else mb  # a pixel is inside if any of its channels is
            if mb is not None and mb.ndim - 1 < len(feature_shape):  # (N, H, W) masks of (C, H, W) samples: align the trailing dims
                mb = mb.reshape(mb.shape[0], *(1,) * (len(feature_shape) + 1 - mb.ndim), *mb.shape[1:])
            acc.update(batch, theirs_b, mb)
        doc = acc.result()
        doc["definitions"] = dict(DEFINITIONS)
        doc["run"] = {"dir": str(reader.run_dir), "method": meta.get("method"), "params": meta.get("params"), "precision": meta.get("precision"), "status": meta.get("status"), "total": meta.get("total")}
        if other is not None:
            doc["run"]["compare"] = {"dir": str(other.run_dir), "method": other.metadata.get("method"), "precision": other.metadata.get("precision")}

        # 2. model-based checks on a random sample.
        if model is not None and llm:
            from ..llm.audit import text_deletion

            doc["text_deletion"] = text_deletion(reader, model, top_k=top_k, sample=sample, seed=seed)
            if randomization != "none":  # the run's own attribution, rebuilt from its manifest (fastattr/llm/randomization.py)
                randomization = "cascade" if randomization == "auto" else randomization
                from ..llm.randomization import randomization_check as llm_randomization

                doc["randomization"] = llm_randomization(reader, model, mode=randomization, sample=randomization_sample, max_similarity=max_similarity, seed=seed)
        if model is not None and source is not None:
            randomization = "cascade" if randomization == "auto" else randomization
            doc.update(model_checks(reader, source, model, name, sample=sample, steps=steps, replacement=replacement, value=replacement_value,
                                     blur_sigma=blur_sigma, score=score, randomization=randomization, randomization_sample=randomization_sample,
                                     max_similarity=max_similarity, attribute_fn=attribute_fn, max_rows=max_rows, batch_size=batch_size, seed=seed))  # fmt: skip
        if skipped:
            doc["randomization_skipped"] = skipped
        if model is not None:
            doc["run"]["model_matches"] = _same_model(reader, model)
        doc["thresholds"] = {k: v for k, v in thresholds.items() if v is not None and v is not False}
        result = AuditResult(doc, acc.class_maps(), check_thresholds(doc, thresholds), audit_warnings(doc, thresholds))
        doc["passed"] = result.passed
        doc["violations"] = list(result.violations)
        doc["warnings"] = list(result.warnings)
        return result
    finally:  # close only what this call opened
        if not isinstance(run, RunReader):
            reader.close()
        if other is not None and not isinstance(compare, RunReader):
            other.close()
