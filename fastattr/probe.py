"""Precision probes: the error of a mixed-precision policy, measured against fp32 on a few samples.

A bf16/fp16/tf32 result can be far from fp32 while its completeness residual stays small (a
random-init ResNet-50's bf16 IG is ~20% off in relative L2 with a residual below 1e-3), so the
error is measured instead: the first few samples (``samples``, default 4) are attributed with the
same method and steps in fp32 and in the policy, and the per-sample relative L2 error
``||a_policy - a_fp32|| / ||a_fp32||`` (over every attributed input of the sample) is reported
as its max and median. ``precision="auto"`` probes every candidate policy of the device, times
each probe pass, and takes the fastest whose max error is within the tolerance (fp32 always is).

Runs (fastattr/runner.py) record the probe in the manifest (``precision_probe``, a volatile
key: a re-measured probe never blocks a resume); attribution calls (fastattr/attribution.py)
keep it in ``method.last_probe``. Timings are wall-clock on the device (synchronized on CUDA),
so auto's choice between policies of similar speed can vary between runs; ``choose`` is the pure
decision from given errors and times.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .precision import AUTO

logger = logging.getLogger(__name__)

REFERENCE = "fp32"
PROBE_SAMPLES = 4
DEFAULT_TOLERANCE = 0.01
DEFAULT_WARN = 0.01
# Candidates of precision="auto" per device type. fp16 on CPU runs emulated kernels (measured 7-20x
# slower than fp32 on the 2-core CPU, benchmarks/RESULTS.md) and tf32 changes nothing there.
CANDIDATES = {"cuda": ("fp32", "tf32", "bf16", "fp16"), "cpu": ("fp32", "bf16")}


@dataclass
class ProbeResult:
    """One probe: ``policy`` (the one measured, or auto's choice) against fp32 on ``samples`` samples."""

    policy: str
    samples: int
    rel_err_max: float
    rel_err_median: float
    requested: str  # the policy asked for: the same as policy, or "auto"
    seconds: dict[str, float] = field(default_factory=dict)  # one probe pass per policy (fp32 included)
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)  # auto: every candidate's errors and time
    tolerance: float | None = None  # auto only
    reference: str = REFERENCE

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy, "requested": self.requested, "samples": self.samples, "rel_err_max": self.rel_err_max,
            "rel_err_median": self.rel_err_median, "reference": self.reference, "seconds": dict(self.seconds),
        }  # fmt: skip
        if self.requested == AUTO:
            out["tolerance"] = self.tolerance
            out["candidates"] = {k: dict(v) for k, v in self.candidates.items()}
        return out

    def line(self) -> str:
        return describe(self.as_dict())


def describe(probe: dict[str, Any]) -> str:
    """One line for a recorded probe (a run summary, ``fastattr info``)."""
    head = f"precision {probe.get('policy')}"
    if probe.get("requested") == AUTO:
        cands = ", ".join(
            f"{k} {v.get('rel_err_max', math.nan):.2%} in {v.get('seconds', math.nan):.3g} s" for k, v in (probe.get("candidates") or {}).items()
        )
        head += f" (auto, tolerance {probe.get('tolerance', math.nan):.2%}; max error, probe time: {cands})"
    return (
        f"{head}: probe error vs {probe.get('reference', REFERENCE)} on {probe.get('samples')} samples: "
        f"max {probe.get('rel_err_max', math.nan):.2%}, median {probe.get('rel_err_median', math.nan):.2%} relative L2"
    )


def candidates(device: torch.device) -> tuple[str, ...]:
    return CANDIDATES.get(device.type, CANDIDATES["cpu"])


def rel_errors(reference: Sequence[torch.Tensor], result: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample relative L2 error of ``result`` against ``reference`` over all their tensors (float64).
    A sample whose reference is zero has error 0 if the result is zero too, else inf."""
    num = sum(((r.detach().double() - a.detach().double()).reshape(a.shape[0], -1) ** 2).sum(1) for a, r in zip(reference, result))
    den = sum((a.detach().double().reshape(a.shape[0], -1) ** 2).sum(1) for a in reference)
    num, den = num.sqrt().cpu(), den.sqrt().cpu()
    err = num / den.clamp_min(torch.finfo(torch.float64).tiny)
    err = torch.where(den > 0, err, torch.where(num > 0, math.inf, 0.0))
    return torch.where(torch.isnan(err), math.inf, err)  # a NaN result is as far off as it gets


def choose(errors: dict[str, float], seconds: dict[str, float], tolerance: float) -> str:
    """precision='auto': the fastest policy whose error is within ``tolerance``; fp32 when none is
    (its own error is 0 by definition). Ties go to the earlier policy in ``errors``' order."""
    ok = [p for p, e in errors.items() if e <= tolerance or p == REFERENCE]
    if not ok:
        return REFERENCE
    return min(ok, key=lambda p: (seconds.get(p, math.inf), list(errors).index(p)))


@contextlib.contextmanager
def _restored(np_state: Any) -> Iterator[None]:
    try:
        yield
    finally:
        np.random.set_state(np_state)


def _timed(call: Callable[[str], list[torch.Tensor]], policy: str, device: torch.device) -> tuple[list[torch.Tensor], float]:
    """The policy's probe attributions and the seconds of the pass (synchronized on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = [a.detach() for a in call(policy)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def measure(
    call: Callable[[str], list[torch.Tensor]],
    requested: str,
    device: torch.device,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    warn: float = DEFAULT_WARN,
    policies: Sequence[str] | None = None,
    repeats: int | None = None,
) -> ProbeResult:
    """Probe ``requested`` (a policy or "auto") with ``call(policy) -> attributions of the probe samples``.
    Random draws (noise, references) repeat exactly for every policy: torch's and numpy's global RNGs
    are reset before each call, and restored afterwards (the call itself then draws as it would).
    ``policies``: auto's candidates (default: the device's); ``repeats``: passes per policy (default 2
    for auto, whose choice depends on times: its seconds are the fastest pass, else 1). Logs a warning when the result's error exceeds ``warn``."""
    auto = requested == AUTO
    todo = list(policies or candidates(device)) if auto else [requested]
    if REFERENCE in todo:
        todo.remove(REFERENCE)
    repeats = repeats or (2 if auto else 1)
    cuda = [device] if device.type == "cuda" else []
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda), _restored(np_state):
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device) if cuda else None

        def seeded(policy: str) -> list[torch.Tensor]:
            np.random.set_state(np_state)
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            return call(policy)

        # every policy once (errors), then again in turn (times): each is timed warm, not first (one-time costs:
        # kernel setup, the CPU row tuner, the target forward) and not only after the others
        order = [REFERENCE, *todo]
        results, seconds = {}, {}
        for p in order:
            results[p], seconds[p] = _timed(seeded, p, device)
        for _ in range(repeats - 1):
            for p in order:
                seconds[p] = min(seconds[p], _timed(seeded, p, device)[1])
    ref = results[REFERENCE]
    errs = {p: rel_errors(ref, got) for p, got in results.items()}
    stats = {p: {"rel_err_max": float(e.max()), "rel_err_median": float(e.median()), "seconds": seconds[p]} for p, e in errs.items()}
    policy = choose({p: s["rel_err_max"] for p, s in stats.items()}, seconds, tolerance) if auto else requested
    res = ProbeResult(
        policy, int(ref[0].shape[0]), stats[policy]["rel_err_max"], stats[policy]["rel_err_median"], requested, seconds,
        stats if auto else {}, tolerance if auto else None,
    )  # fmt: skip
    if res.rel_err_max > warn:
        logger.warning("%s: over precision_warn=%.2g; use precision='fp32' (or 'auto') where this matters", res.line(), warn)
    else:
        logger.info("%s", res.line())
    return res


def take_samples(value: Any, batch: int, k: int, *, name: str = "", per_sample_baselines: bool = True) -> Any:
    """``value`` (an argument of an attribution call) cut to its first ``k`` samples: tensors whose
    first dim is the batch, tuples / dicts of those, a per-sample target list; anything else as given.
    ``per_sample_baselines=False`` (GradientShap: baselines are a reference distribution) keeps them whole."""
    if name == "baselines" and not per_sample_baselines:
        return value
    if isinstance(value, torch.Tensor):
        return value[:k] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(take_samples(v, batch, k) for v in value)
    if isinstance(value, list) and name == "target" and len(value) == batch:
        return value[:k]
    if isinstance(value, dict):
        return {key: take_samples(v, batch, k) for key, v in value.items()}
    return value
