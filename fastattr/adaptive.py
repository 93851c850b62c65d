"""Accuracy-targeted integrated gradients: per-sample adaptive steps to a completeness tolerance.

The user states the accuracy, ``|delta| <= tolerance * |F(x) - F(x0)|`` (or ``abs_tolerance``
where that difference is near zero), and a ``max_steps`` cap; each sample is refined on
its own until it meets the tolerance or reaches the cap.

Entry point (generic over what the path runs through, so layer IG reuses it)::

    settings = AdaptiveSettings.check(tolerance=0.01, max_steps=257, abs_tolerance=1e-6, rule="simpson")
    res = integrate_adaptive(engine, problem, settings, f_x=None, f_x0=None, node_engine=None)
    res.accs        # per input, (B, F) flat accumulators in the working layout, like Engine.integrate
    res.n_steps     # (B,) int64 gradient evaluations per sample (all levels' points)
    res.bound       # (B,) completeness bound: |delta| (gausslegendre) or sum of |panel residuals|
    res.converged   # (B,) bool; False where the cap (or a non-finite value) stopped refinement
    res.output, res.baseline_output   # F(x), F(x0) per sample

``problem`` is an engine ``Problem`` with baselines (inputs, or a layer's activations);
``engine`` runs the gradient passes under its precision policy and row budget; under bf16 /
fp16 ``node_engine`` (an fp32 Engine) does the forward-only evaluations of F, so residuals are
measured against the real model. ``f_x`` / ``f_x0``, when given, replace the endpoint values.

Rules (``method``): "simpson" (the default), "trapezoid", "gausslegendre". At a stated
tolerance Simpson pays the least for it (DEFAULT_RULE below has the measurement); Gauss-Legendre
doubling buys accuracy well past the tolerance on smooth models.

gausslegendre: per-sample Gauss-Legendre doubling. Level k evaluates the n0 2^k points of the
Gauss-Legendre rule (n0 = ``min_steps``, default 8) for every sample still refining; the
levels are not nested, so a sample that stops after level k has made n0 (2^(k+1) - 1) gradient
evaluations (8, 24, 56, 120, 248, ...), all reported in ``n_steps``, and its attribution is the
last level's rule. F(x) and F(x0) cost 2 forward-only fp32 rows per sample (Gauss points
exclude the endpoints); nothing else is evaluated forward-only. A sample stops once BOTH its
completeness residual |delta_k| <= max(tolerance |F(x) - F(x0)|, abs_tolerance) AND the
attribution has settled, ||(A_k - A_{k-1})|| <= tolerance ||A_k|| + abs_tolerance (L2 over
all inputs' features), so every sample needs two levels. The vector condition is the one that
tracks the attribution error: the scalar residual cancels (on the ReLU CNN below, Gauss-
Legendre's residual plateaus near 1e-3 of |dF| while the attribution error keeps falling).

simpson / trapezoid: nested composite Newton-Cotes on a dyadic grid. A sample at level k has
evaluated the 2^k + 1 points alpha = j / 2^k; going to level k + 1 evaluates only the 2^k new
midpoints, so every gradient evaluation is reused (n = 5, 9, 17, 33, ...). Three accumulators
per sample hold the endpoint gradients (E), the interior of the previous level (I) and the
newest midpoints (N); trapezoid h (E/2 + I + N), Simpson h/3 (E + 2I + 4N). F at every grid
point comes from the gradient forwards under fp32 (under bf16/fp16 ``node_engine`` evaluates
it forward-only in fp32). Each panel's completeness residual r_p = rule_p(dF/dalpha) -
(F(b) - F(a)) is exact, and a sample stops when sum_p |r_p| <= max(tolerance |F(x) - F(x0)|,
abs_tolerance) and the trapezoid and Simpson attributions agree to the tolerance
(``agreement``). The reported delta is sum_p r_p, so |delta| <= the bound.

Every round packs the (sample, point) pairs of all samples still refining into one pass
(``Engine.integrate_pairs``), chunked under the row budget, so samples share forwards. For
every rule, a sample that stops before the cap meets |delta| <= max(tolerance |dF|,
abs_tolerance); samples at the cap are reported (``converged`` False, logged).

Choice of rule, measured on the demo's trained 1x24x24 CNN (ReLU, max pool) and its GELU /
average-pool twin, 16 samples, relative L2 error against float64 Gauss-Legendre 2048 steps
(benchmarks/results/adaptive.md; mean gradient evaluations per sample, error):

    fixed Gauss-Legendre n     8        16       32       50       64
      ReLU                     3.0e-2   1.7e-2   9.0e-3   5.8e-3   4.3e-3
      GELU                     3.8e-4   3.0e-6   5.5e-8   5.8e-8   5.3e-8
    auto gausslegendre (n0 = 8), tolerance 0.1 / 0.03 / 0.01 / 1e-4
      ReLU                     24, 1.7e-2 / 50, 1.1e-2 / 176, 3.2e-3 / 248 (cap), 2.2e-3
      GELU                     24, 3.1e-6 / 24, 3.1e-6 / 24, 3.1e-6 / 46, 1.5e-7
    auto simpson, tolerance 0.1 / 0.03 / 0.01 / 1e-4
      ReLU                     7, 6.3e-2 / 18, 2.5e-2 / 65, 7.5e-3 / 257 (cap), 1.4e-3
      GELU                     5, 1.3e-2 / 6, 1.1e-2 / 8, 6.2e-4 / 59, 1.2e-7

On the smooth model Gauss doubling wins clearly (3e-6 in 24 evaluations; Simpson needs about
33 fixed points for that); on the ReLU model both adaptive rules sit on or above fixed
Gauss-Legendre's error-per-evaluation curve. Levers measured and rejected (scratch studies,
numbers in benchmarks/results/adaptive.md): composite Gauss on panels bisected by their exact
completeness residual (F at panel ends forward-only) was 2-5x worse than fixed GL on ReLU at
equal evaluations (the scalar residual does not locate the vector error); fixed warps
alpha = t^p with midpoint or Gauss rules gained at most 1.3x on ReLU and lost on GELU; a
kink-matching trapezoid (one kink per interval solved from F) gained nothing (about 180
gradient jumps per path). Why the ReLU model resists: the gradient along each path is piecewise
constant with ~180 jumps spread over alpha in [0, 0.6] (half the vector variation below 0.14),
and every sample is about equally hard (per-sample GL-16 errors within 0.9-2.6%), so neither
per-sample allocation nor point placement has much to exploit; every rule converges O(1/n).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import Engine, Problem
from .errors import OptionError
from .quadrature import points_and_weights

logger = logging.getLogger(__name__)

RULES = ("simpson", "trapezoid", "gausslegendre")
NESTED = ("simpson", "trapezoid")  # dyadic-grid rules (every evaluation reused)
# Chosen by measurement (benchmarks/RESULTS.md, "Adaptive steps", quiet host): at the default
# tolerance 0.01 Simpson used 64.5 mean steps on the ReLU CNN (error 7.3e-3) and 9.1 on the GELU CNN
# (6.2e-4), Gauss-Legendre doubling 164 (3.5e-3) and 24 (3.1e-6): both meet the stated tolerance,
# Simpson pays 2.5x less for it. Gauss-Legendre stays available for accuracy well past the tolerance.
DEFAULT_RULE = "simpson"
DEFAULT_TOLERANCE = 0.01
DEFAULT_MAX_STEPS = 257
DEFAULT_MIN_STEPS = 5  # dyadic rules: first grid 2^k + 1 >= 5 points
DEFAULT_GAUSS_START = 8  # gausslegendre: first level's points (levels n0, 2 n0, 4 n0, ...)
DEFAULT_ABS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AdaptiveSettings:
    """Validated settings of an adaptive pass; build with ``AdaptiveSettings.check``."""

    tolerance: float
    max_steps: int  # the cap as given
    abs_tolerance: float
    min_steps: int
    rule: str
    agreement: bool = True  # also require the trapezoid and Simpson attributions to agree
    start_level: int = field(init=False)
    max_level: int = field(init=False)

    def __post_init__(self) -> None:
        if self.rule == "gausslegendre":
            # levels k = 0, 1, ...: n0 2^k fresh points, n0 (2^(k+1) - 1) evaluations in all;
            # a sample needs two levels (the vector check compares consecutive ones)
            n0 = self.min_steps
            object.__setattr__(self, "start_level", 1)
            object.__setattr__(self, "max_level", int(math.floor(math.log2(self.max_steps / n0 + 1))) - 1)
            return
        # levels: 2^k + 1 points; start at the smallest level with >= min_steps points,
        # stop at the largest with <= max_steps points
        object.__setattr__(self, "start_level", max(1, math.ceil(math.log2(self.min_steps - 1))))
        object.__setattr__(self, "max_level", int(math.floor(math.log2(self.max_steps - 1))))

    def steps_at(self, level: int) -> int:
        """Gradient evaluations a sample has made once it finished ``level``."""
        if self.rule == "gausslegendre":
            return self.min_steps * (2 ** (level + 1) - 1)
        return 2**level + 1

    @property
    def cap(self) -> int:
        """Largest step count a sample can use (dyadic: the largest 2^k + 1 <= max_steps;
        gausslegendre: the largest n0 (2^(k+1) - 1) <= max_steps)."""
        return self.steps_at(self.max_level)

    @classmethod
    def check(
        cls,
        tolerance: float | None = None,
        max_steps: int | None = None,
        abs_tolerance: float | None = None,
        min_steps: int | None = None,
        rule: str | None = None,
        agreement: bool = True,
    ) -> AdaptiveSettings:
        """Validate every setting (raising OptionError, a ValueError, that names it) before any model work."""
        tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
        max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
        abs_tolerance = DEFAULT_ABS_TOLERANCE if abs_tolerance is None else abs_tolerance
        rule = DEFAULT_RULE if rule is None else rule
        if min_steps is None:
            min_steps = DEFAULT_GAUSS_START if rule == "gausslegendre" else DEFAULT_MIN_STEPS
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance <= 0:
            raise OptionError(f"tolerance must be a positive finite number (relative to |F(x) - F(x0)|), got {tolerance!r}")
        if isinstance(abs_tolerance, bool) or not isinstance(abs_tolerance, (int, float)) or not math.isfinite(abs_tolerance) or abs_tolerance < 0:
            raise OptionError(f"abs_tolerance must be a finite number >= 0, got {abs_tolerance!r}")
        for name, v in (("min_steps", min_steps), ("max_steps", max_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 3:
                raise OptionError(f"{name} must be an int >= 3 (adaptive grids have 2^k + 1 >= 3 points), got {v!r}")
        if max_steps < min_steps:
            raise OptionError(f"max_steps ({max_steps}) must be >= min_steps ({min_steps})")
        if rule not in RULES:
            raise OptionError(f"unknown adaptive rule {rule!r}; choose one of {', '.join(RULES)}")
        settings = cls(float(tolerance), max_steps, float(abs_tolerance), min_steps, rule, bool(agreement))
        if settings.max_level < settings.start_level:
            if rule == "gausslegendre":
                raise OptionError(f"max_steps={max_steps} leaves no level: gausslegendre needs two levels, min_steps + 2 min_steps = {3 * min_steps} evaluations")
            raise OptionError(f"max_steps={max_steps} leaves no level at or above min_steps={min_steps}: grids have 2^k + 1 points")
        return settings


def given(**settings: Any) -> dict[str, Any]:
    """The adaptive settings a caller actually passed (None means not given)."""
    return {k: v for k, v in settings.items() if v is not None}


def resolve(n_steps: int | str, method: str | None, settings: dict[str, Any]) -> AdaptiveSettings | None:
    """n_steps="auto": the validated settings for rule ``method`` (None: DEFAULT_RULE); a fixed
    n_steps: None, refusing adaptive-only ``settings``. Every method that takes n_steps="auto"
    goes through here, so they all fail alike, before any model work."""
    if isinstance(n_steps, str):
        if n_steps != "auto":
            raise OptionError(f"n_steps must be a positive int or 'auto', got {n_steps!r}")
        rule = method or DEFAULT_RULE
        if rule not in RULES:
            raise OptionError(f"n_steps='auto' refines only the rules {', '.join(RULES)}, got method={method!r}")
        return AdaptiveSettings.check(rule=rule, **settings)
    if settings:
        raise OptionError(f"{', '.join(settings)} only apply with n_steps='auto', got n_steps={n_steps!r}")
    return None


@dataclass
class AdaptiveResult:
    accs: tuple[torch.Tensor, ...]  # per input, (B, F) sum_j w_j dF/dx at the final grid, working layout
    n_steps: torch.Tensor  # (B,) int64 gradient evaluations per sample
    bound: torch.Tensor  # (B,) sum of |panel residuals| (>= |delta|), accumulator dtype
    converged: torch.Tensor  # (B,) bool
    output: torch.Tensor  # (B,) F(x)
    baseline_output: torch.Tensor  # (B,) F(x0)
    rounds: list[int] = field(default_factory=list)  # samples refined per round (round 0: all)


def _level_nodes(level: int, grid: int) -> torch.Tensor:
    """Indices (on the finest grid of ``grid`` intervals) of points new at ``level``."""
    stride = grid >> level
    if level == 0:
        return torch.tensor([0, grid])
    return torch.arange(stride, grid, 2 * stride)


def _panel_bound(F: torch.Tensor, D: torch.Tensor, level: int, grid: int, rule: str) -> torch.Tensor:
    """sum over panels of |rule(dF/dalpha) - (F(b) - F(a))| for rows at ``level`` ((n, grid+1) tables)."""
    st = grid >> level
    f, d = F[:, ::st], D[:, ::st]  # (n, 2^level + 1) values at this level's points
    h = 1.0 / 2**level
    if rule == "trapezoid":
        r = h / 2 * (d[:, :-1] + d[:, 1:]) - (f[:, 1:] - f[:, :-1])
    else:
        r = h / 3 * (d[:, :-2:2] + 4 * d[:, 1::2] + d[:, 2::2]) - (f[:, 2::2] - f[:, :-2:2])
    return r.abs().sum(1)


def _agreement(stacks: tuple[torch.Tensor, ...], diffs: list[torch.Tensor], active: torch.Tensor, batch: int, level: int, settings: AdaptiveSettings) -> torch.Tensor:
    """Per active sample: do the trapezoid and Simpson attributions on the same points agree,
    ||(S - T)(x - x0)|| <= tolerance ||A (x - x0)|| + abs_tolerance (A: the rule's own)?"""
    h = 1.0 / 2**level
    num = den = 0.0
    for st, d in zip(stacks, diffs):
        e, i, n = st[active], st[batch + active], st[2 * batch + active]
        t = h * (e / 2 + i + n)
        s = h / 3 * (e + 2 * i + 4 * n)
        dd = d[active].to(st.dtype)
        num = num + ((s - t) * dd).square().sum(1)
        den = den + ((t if settings.rule == "trapezoid" else s) * dd).square().sum(1)
    return num.sqrt() <= settings.tolerance * den.sqrt() + settings.abs_tolerance


def integrate_adaptive(
    engine: Engine,
    problem: Problem,
    settings: AdaptiveSettings,
    f_x: torch.Tensor | None = None,
    f_x0: torch.Tensor | None = None,
    node_engine: Engine | None = None,
) -> AdaptiveResult:
    """Refine each sample's dyadic grid until its panel residuals meet the tolerance (see module doc)."""
    if problem.baselines is None:
        raise ValueError("adaptive integration needs a path: the problem has no baselines")
    if settings.rule == "gausslegendre":
        return _integrate_gauss(engine, problem, settings, f_x, f_x0, node_engine)
    batch, device = problem.batch, problem.device
    acc_dtype = torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32
    # F along the path from the gradient forwards only when they run in full precision
    nodes_from_grad = engine.precision.name == "fp32" or acc_dtype == torch.float64
    if not nodes_from_grad and node_engine is None:
        raise ValueError(f"precision {engine.precision.name!r} needs an fp32 node_engine to evaluate F along the path")
    grid = 2**settings.max_level
    Ft = torch.full((batch, grid + 1), math.nan, dtype=acc_dtype, device=device)
    Dt = torch.full((batch, grid + 1), math.nan, dtype=acc_dtype, device=device)
    # three stacked accumulator slots per input: E (endpoints), I (older interior), N (newest points)
    stacks = tuple(torch.zeros(3 * batch, lay.flat(x).shape[1], dtype=acc_dtype, device=device) for lay, x in zip(problem.layouts, problem.inputs))
    E_, I_, N_ = 0, 1, 2
    diffs: list[torch.Tensor] = []  # x - x0 per input, in the layout the first pass settled (Engine.settle_layout)
    level = torch.full((batch,), settings.start_level, dtype=torch.long, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    bound = torch.full((batch,), math.inf, dtype=acc_dtype, device=device)
    active = torch.arange(batch, device=device)
    rounds: list[int] = []
    k = settings.start_level
    f_ref = f_x0_ref = None
    while active.numel():
        n_act = active.numel()
        rounds.append(n_act)
        # this round's (sample, point) pairs: all points up to level k on round 0, else level k's new points
        if len(rounds) == 1:
            parts = [(_level_nodes(lv, grid), E_ if lv == 0 else (I_ if lv < k else N_)) for lv in range(k + 1)]
        else:
            parts = [(_level_nodes(k, grid), N_)]
        nodes = torch.cat([p[0] for p in parts]).to(device)
        slots = torch.cat([torch.full((p[0].numel(),), p[1], dtype=torch.long) for p in parts]).to(device)
        # node-major order: a chunk holds one point for many samples, like Engine.integrate
        ex = active.repeat(nodes.numel())
        node_of = nodes.repeat_interleave(n_act)
        dest = slots.repeat_interleave(n_act) * batch + ex
        alphas = node_of.to(acc_dtype) / grid
        outs, dots = engine.integrate_pairs(problem, ex, alphas, torch.ones_like(alphas), stacks, dest=dest)
        if not diffs:  # the agreement check compares attributions, not accumulators
            diffs = [lay.flat(x) - lay.flat(b) for lay, x, b in zip(problem.layouts, problem.inputs, problem.baselines)]
        if not nodes_from_grad:
            assert node_engine is not None
            outs = node_engine.outputs_pairs(problem, ex, alphas)
        Ft[ex, node_of] = outs
        Dt[ex, node_of] = dots
        if len(rounds) == 1:  # endpoints known now: the caller's fp32 values take precedence
            if f_x is not None:
                Ft[:, grid] = f_x.to(acc_dtype)
            if f_x0 is not None:
                Ft[:, 0] = f_x0.to(acc_dtype)
            f_ref, f_x0_ref = Ft[:, grid].clone(), Ft[:, 0].clone()
            scale = torch.clamp((f_ref - f_x0_ref).abs() * settings.tolerance, min=settings.abs_tolerance)
        b = _panel_bound(Ft[active], Dt[active], k, grid, settings.rule)
        bound[active] = b
        done = b <= scale[active]
        if settings.agreement:
            done &= _agreement(stacks, diffs, active, batch, k, settings)
        finite = torch.isfinite(b)
        converged[active] = done
        stop = done | ~finite | (k >= settings.max_level)
        if bool((~finite).any()):
            logger.warning("%d sample(s) have non-finite outputs or gradients along the path; not refined further", int((~finite).sum()))
        active = active[~stop]
        if not active.numel():
            break
        # the samples going on: fold the newest points into the interior, advance a level
        for st in stacks:
            st[I_ * batch + active] += st[N_ * batch + active]
            st[N_ * batch + active] = 0
        k += 1
        level[active] = k
    # final accumulators at each sample's level: trapezoid h (E/2 + I + N), Simpson h/3 (E + 2I + 4N)
    h = (1.0 / torch.pow(2.0, level.to(acc_dtype))).unsqueeze(1)
    accs = []
    for st in stacks:
        e, i, n = st[:batch], st[batch : 2 * batch], st[2 * batch :]
        accs.append(h * (e / 2 + i + n) if settings.rule == "trapezoid" else h / 3 * (e + 2 * i + 4 * n))
    n_steps = torch.pow(2, level) + 1
    hit_cap = int((~converged).sum())
    if hit_cap:
        logger.info("adaptive IG: %d of %d sample(s) did not reach tolerance %g within %d steps", hit_cap, batch, settings.tolerance, settings.cap)
    assert f_ref is not None and f_x0_ref is not None
    return AdaptiveResult(tuple(accs), n_steps, bound, converged, f_ref, f_x0_ref, rounds)


def _integrate_gauss(
    engine: Engine,
    problem: Problem,
    settings: AdaptiveSettings,
    f_x: torch.Tensor | None,
    f_x0: torch.Tensor | None,
    node_engine: Engine | None,
) -> AdaptiveResult:
    """Per-sample Gauss-Legendre doubling (see module doc): level k evaluates n0 2^k fresh points;
    a sample stops once its completeness residual and the vector change from the previous level
    both meet the tolerance."""
    batch, device = problem.batch, problem.device
    acc_dtype = torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32
    if engine.precision.name != "fp32" and acc_dtype != torch.float64 and node_engine is None:
        raise ValueError(f"precision {engine.precision.name!r} needs an fp32 node_engine to evaluate F(x) and F(x0)")
    # F(x), F(x0): the caller's, else 2 forward-only rows per sample in fp32 (GL has no endpoints)
    if f_x is None or f_x0 is None:
        ends = (node_engine or engine).outputs_pairs(
            problem, torch.arange(batch, device=device).repeat(2), torch.cat([torch.ones(batch), torch.zeros(batch)]).to(device)
        )
        f_x = ends[:batch] if f_x is None else f_x
        f_x0 = ends[batch:] if f_x0 is None else f_x0
    f_x, f_x0 = f_x.to(device=device, dtype=acc_dtype), f_x0.to(device=device, dtype=acc_dtype)
    d_f = f_x - f_x0
    scale = torch.clamp(d_f.abs() * settings.tolerance, min=settings.abs_tolerance)
    # two accumulator slots per input: PREV (the last finished level) and CUR (this level)
    stacks = tuple(torch.zeros(2 * batch, lay.flat(x).shape[1], dtype=acc_dtype, device=device) for lay, x in zip(problem.layouts, problem.inputs))
    diffs: list[torch.Tensor] = []  # x - x0 per input, in the layout the first pass settled
    level = torch.zeros(batch, dtype=torch.long, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    bound = torch.full((batch,), math.inf, dtype=acc_dtype, device=device)
    active = torch.arange(batch, device=device)
    rounds: list[int] = []
    k = 0
    while active.numel():
        n_act = active.numel()
        rounds.append(n_act)
        a, w = points_and_weights("gausslegendre", settings.min_steps * 2**k)
        # every sample still refining is at level k: one rectangular pass over them (the engine's
        # fast path, chunked under the row budget like any other) instead of per-pair scatters
        sub = problem if n_act == batch else _subset(problem, active)
        level_accs = engine.integrate(sub, a, w)
        problem.target_checked = problem.target_checked or sub.target_checked
        if not diffs:
            diffs = [(lay.flat(x) - lay.flat(b)).to(acc_dtype) for lay, x, b in zip(problem.layouts, problem.inputs, problem.baselines)]
        integral = torch.zeros(n_act, dtype=acc_dtype, device=device)
        for st, acc, d in zip(stacks, level_accs, diffs):
            st[batch + active] = acc.to(acc_dtype)
            integral += (acc.to(acc_dtype) * d[active]).sum(1)  # sum_j w_j dF/dalpha(alpha_j): this level's integral of dF
        # completeness residual of this level's rule, exact per sample
        resid = integral - d_f[active]
        bound[active] = resid.abs()
        done = resid.abs() <= scale[active]
        if k >= 1:  # the attribution itself must also have settled: ||(A_k - A_{k-1})|| <= tol ||A_k||
            num = den = torch.zeros(n_act, dtype=acc_dtype, device=device)
            for st, d in zip(stacks, diffs):
                cur, dd = st[batch + active], d[active]
                num = num + ((cur - st[active]) * dd).square().sum(1)
                den = den + (cur * dd).square().sum(1)
            done &= num.sqrt() <= settings.tolerance * den.sqrt() + settings.abs_tolerance
        else:
            done &= False
        finite = torch.isfinite(resid)
        converged[active] = done
        level[active] = k
        stop = done | ~finite | (k >= settings.max_level)
        if bool((~finite).any()):
            logger.warning("%d sample(s) have non-finite outputs or gradients along the path; not refined further", int((~finite).sum()))
        active = active[~stop]
        for st in stacks:  # the samples going on keep this level as the one to compare against
            st[active] = st[batch + active]
        k += 1
    n_steps = settings.min_steps * (torch.pow(2, level + 1) - 1)
    hit_cap = int((~converged).sum())
    if hit_cap:
        logger.info("adaptive IG: %d of %d sample(s) did not reach tolerance %g within %d steps", hit_cap, batch, settings.tolerance, settings.cap)
    return AdaptiveResult(tuple(st[batch:] for st in stacks), n_steps, bound, converged, f_x, f_x0, rounds)


def _subset(problem: Problem, idx: torch.Tensor) -> Problem:
    """The problem restricted to examples ``idx`` (inputs, baselines, targets, batch-dim forward args)."""
    take = idx.to(problem.device)
    baselines = None if problem.baselines is None else tuple(b.index_select(0, take) for b in problem.baselines)
    target = None if problem.target is None else problem.target.index_select(0, take.to(problem.target.device))
    args = Engine._rows_of_args(problem.forward_args, problem.batch, take)
    kwargs = Engine._rows_of_kwargs(problem.forward_kwargs, problem.batch, take)
    return Problem(tuple(x.index_select(0, take) for x in problem.inputs), baselines, target, args, problem.target_checked, problem.channels_last, kwargs)


def summarize_steps(n_steps: torch.Tensor, converged: torch.Tensor) -> dict[str, object]:
    """Distribution of per-sample steps and the samples that hit the cap, for run summaries."""
    steps = n_steps.detach().cpu().long()
    values, counts = torch.unique(steps, return_counts=True)
    not_conv = (~converged.detach().cpu()).nonzero().flatten().tolist()
    return {
        "samples": int(steps.numel()),
        "mean_steps": float(steps.double().mean()) if steps.numel() else math.nan,
        "histogram": {int(v): int(c) for v, c in zip(values, counts)},
        "not_converged": len(not_conv),
        "not_converged_index": not_conv,
    }
