"""Triton kernels vs the float64 torch reference, through the public dispatch.

Runs on CPU with the Triton interpreter (TRITON_INTERPRET=1, set here before triton is
imported). Half-precision inputs are compared against the float64 reference of the same
half-rounded values, so tolerances stay at fp32-accumulation level.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fastattr import kernels  # noqa: E402

reference = kernels.reference

# The public dispatch functions, called with backend="triton" to drive the kernels.
path_accumulate, finalize, moments, channel_reduce = (
    kernels.path_accumulate,
    kernels.finalize,
    kernels.moments,
    kernels.channel_reduce,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FS = [1, 7, 1000, 1531]
BS = [1, 3, 7]
SS = [1, 5]
NAN = float("nan")


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))  # stable across runs


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _close(got, ref, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), rtol=rtol, atol=atol, equal_nan=True)


# the interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest even): allow 1 bf16 ulp
_CAST_RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty return NaN-filled (float) or garbage-filled (int) memory, so unwritten
    output elements or partials show up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(NAN) if t.is_floating_point() else t.fill_(-12345)

    monkeypatch.setattr(torch, "empty", empty)


# --------------------------------------------------------------------------- path_accumulate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", FS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("S", SS)
@pytest.mark.parametrize("per_row", [False, True])
def test_path_accumulate(dtype, F, B, S, per_row):
    g = _gen("pa", dtype, F, B, S, per_row)
    acc = _randn(g, B, F)
    grads = _randn(g, S, B, F, dtype=dtype)
    weights = _randn(g, *((S, B) if per_row else (S,)))
    ref = reference.path_accumulate(acc.double(), grads.double(), weights.double())
    out = path_accumulate(acc, grads, weights, backend="triton")
    assert out.data_ptr() == acc.data_ptr() and out.dtype == torch.float32
    _close(out, ref)


def test_path_accumulate_casts_weights():
    g = _gen("pa-w")
    acc, grads, weights = _randn(g, 3, 7), _randn(g, 5, 3, 7), _randn(g, 5, dtype=torch.float64)
    ref = reference.path_accumulate(acc.double(), grads.double(), weights)
    _close(path_accumulate(acc, grads, weights, backend="triton"), ref)


def test_path_accumulate_empty():
    g = _gen("pa-empty")
    acc = _randn(g, 3, 7)
    before = acc.clone()
    path_accumulate(acc, torch.empty(0, 3, 7, device=DEVICE), torch.empty(0, device=DEVICE), backend="triton")  # S=0
    assert torch.equal(acc, before)
    empty = torch.empty(0, 7, device=DEVICE)
    grads = torch.empty(2, 0, 7, device=DEVICE)
    assert path_accumulate(empty, grads, torch.ones(2, device=DEVICE), backend="triton") is empty


@pytest.mark.parametrize(
    "acc, grads, weights, exc, match",
    [
        (torch.zeros(4, 10), torch.zeros(3, 5, 10), torch.ones(3), ValueError, r"grads must have shape .*\(4, 10\).*\(3, 5, 10\)"),
        (torch.zeros(4, 10), torch.zeros(3, 4, 10), torch.ones(2), ValueError, "weights must have shape"),
        (torch.zeros(4, 10), torch.zeros(3, 4, 10), torch.ones(3, 5), ValueError, "weights must have shape"),
        (torch.zeros(4, 10), torch.zeros(3, 4, 10), torch.ones(3, dtype=torch.int64), TypeError, "weights must be a floating"),
        (torch.zeros(4, 10, dtype=torch.float16), torch.zeros(3, 4, 10), torch.ones(3), TypeError, "acc must be float32"),
        (torch.zeros(4, 10), torch.zeros(3, 4, 10, dtype=torch.float64), torch.ones(3), TypeError, "grads must be float32"),
        (torch.zeros(10, 4).t(), torch.zeros(3, 4, 10), torch.ones(3), ValueError, "acc must be contiguous"),
        (torch.zeros(4, 10), torch.zeros(3, 10, 4).transpose(1, 2), torch.ones(3), ValueError, "grads must be contiguous"),
        (torch.zeros(40), torch.zeros(3, 4, 10), torch.ones(3), ValueError, "acc must have shape"),
    ],
)
def test_path_accumulate_errors(acc, grads, weights, exc, match):
    from fastattr.kernels.triton_step_sums import path_accumulate_triton

    with pytest.raises(exc, match=match):
        path_accumulate_triton(acc.to(DEVICE), grads.to(DEVICE), weights.to(DEVICE))


# --------------------------------------------------------------------------- finalize


def _check_stats(stats, ref):
    assert all(s.dtype == torch.float32 for s in stats[:4]) and stats.nonfinite.dtype == torch.int32
    # a row sum may cancel: bound its fp32 error by the row's l1
    sum_err = (stats.sum.double().cpu() - ref.sum.double().cpu()).abs()
    assert (sum_err <= 1e-5 * ref.l1.double().cpu() + 1e-6).all(), sum_err
    _close(stats.l1, ref.l1)
    _close(stats.l2, ref.l2)
    _close(stats.absmax, ref.absmax)
    assert torch.equal(stats.nonfinite.cpu(), ref.nonfinite.cpu())


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("F", FS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("with_base", [False, True])
def test_finalize(poison_empty, in_dtype, out_dtype, F, B, with_base):
    g = _gen("fin", in_dtype, out_dtype, F, B, with_base)
    acc = _randn(g, B, F)
    inputs = _randn(g, B, F, dtype=in_dtype)
    baselines = _randn(g, B, F, dtype=in_dtype) if with_base else None
    ref_attr, ref_stats = reference.finalize(
        acc.double(), inputs.double(), None if baselines is None else baselines.double()
    )
    attr, stats = finalize(acc, inputs, baselines, out_dtype=out_dtype, backend="triton")
    expect = out_dtype or torch.float32
    assert attr.dtype == expect and attr.shape == (B, F)
    assert not attr.isnan().any()
    _close(attr, ref_attr.to(expect), rtol=_CAST_RTOL[expect], atol=1e-6)
    _check_stats(stats, ref_stats)


@pytest.mark.parametrize("F", [7, 1531])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_finalize_nonfinite(poison_empty, F, with_inputs):
    g = _gen("fin-nf", F, with_inputs)
    B = 3
    acc = _randn(g, B, F)
    acc[0, 1] = float("inf")
    acc[0, F - 1] = NAN
    acc[2, 3] = -float("inf")
    if F > 1024:
        acc[2, 1100] = NAN  # in the second F-block
    inputs = _randn(g, B, F) if with_inputs else None
    ref_attr, ref_stats = reference.finalize(acc.double(), None if inputs is None else inputs.double())
    attr, stats = finalize(acc, inputs, backend="triton")
    assert stats.nonfinite.tolist() == [2, 0, 2 if F > 1024 else 1]
    _close(attr, ref_attr)
    assert attr.isnan().sum().item() == ref_attr.isnan().sum().item()
    _check_stats(stats, ref_stats)
    assert torch.isfinite(torch.stack(stats[:4])).all()


@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_finalize_inputs_none_returns_new_tensor(poison_empty, out_dtype):
    g = _gen("fin-none", out_dtype)
    acc = _randn(g, 3, 1000)
    ref_attr, ref_stats = reference.finalize(acc.double())
    attr, stats = finalize(acc, out_dtype=out_dtype, backend="triton")
    assert attr.data_ptr() != acc.data_ptr()
    expect = out_dtype or torch.float32
    _close(attr, ref_attr.to(expect), rtol=_CAST_RTOL[expect], atol=1e-6)
    _check_stats(stats, ref_stats)


def test_finalize_empty():
    for B, F in [(0, 5), (3, 0)]:
        attr, stats = finalize(torch.empty(B, F, device=DEVICE), torch.empty(B, F, device=DEVICE), backend="triton")
        assert attr.shape == (B, F)
        assert all(s.shape == (B,) and not s.any() for s in stats)


@pytest.mark.parametrize(
    "acc, inputs, baselines, kwargs, exc, match",
    [
        (torch.zeros(4, 10), torch.zeros(4, 9), None, {}, ValueError, r"inputs must have shape \(B, F\)=\(4, 10\)"),
        (torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(10), {}, ValueError, "baselines must have shape"),
        (torch.zeros(4, 10, dtype=torch.float64), None, None, {}, TypeError, "acc must be float32"),
        (torch.zeros(4, 10), torch.zeros(4, 10, dtype=torch.int32), None, {}, TypeError, "inputs must be float32"),
        (torch.zeros(4, 10), None, None, {"out_dtype": torch.int8}, TypeError, "out_dtype must be"),
        (torch.zeros(10, 4).t(), None, None, {}, ValueError, "acc must be contiguous"),
        (torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(10, 4).t(), {}, ValueError, "baselines must be contiguous"),
    ],
)
def test_finalize_errors(acc, inputs, baselines, kwargs, exc, match):
    from fastattr.kernels.triton_finalize import finalize_triton

    def move(t):
        return None if t is None else t.to(DEVICE)

    with pytest.raises(exc, match=match):
        finalize_triton(move(acc), move(inputs), move(baselines), **kwargs)


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", FS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("S", SS)
@pytest.mark.parametrize("wkind", ["none", "shared", "per_row"])
def test_moments(dtype, F, B, S, wkind):
    g = _gen("mom", dtype, F, B, S, wkind)
    sum_g, sum_sq = _randn(g, B, F), _randn(g, B, F).abs()
    grads = _randn(g, S, B, F, dtype=dtype)
    weights = {"none": None, "shared": lambda: _randn(g, S), "per_row": lambda: _randn(g, S, B)}[wkind]
    weights = weights() if weights else None
    r1, r2 = reference.moments(sum_g.double(), sum_sq.double(), grads.double(), None if weights is None else weights.double())
    o1, o2 = moments(sum_g, sum_sq, grads, weights, backend="triton")
    assert o1.data_ptr() == sum_g.data_ptr() and o2.data_ptr() == sum_sq.data_ptr()
    _close(o1, r1)
    _close(o2, r2)


def test_moments_empty():
    g = _gen("mom-empty")
    s1, s2 = _randn(g, 2, 5), _randn(g, 2, 5)
    c1, c2 = s1.clone(), s2.clone()
    moments(s1, s2, torch.empty(0, 2, 5, device=DEVICE), backend="triton")
    assert torch.equal(s1, c1) and torch.equal(s2, c2)


@pytest.mark.parametrize(
    "sum_g, sum_sq, grads, weights, exc, match",
    [
        (torch.zeros(4, 10), torch.zeros(4, 9), torch.zeros(2, 4, 10), None, ValueError, "sum_sq must have shape"),
        (torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(2, 4, 11), None, ValueError, "grads must have shape"),
        (torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(2, 4, 10), torch.ones(3), ValueError, "weights must have shape"),
        (torch.zeros(4, 10), torch.zeros(4, 10, dtype=torch.float16), torch.zeros(2, 4, 10), None, TypeError, "sum_sq must be float32"),
        (torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(2, 4, 10, dtype=torch.int8), None, TypeError, "grads must be float32"),
        (torch.zeros(4, 10), torch.zeros(10, 4).t(), torch.zeros(2, 4, 10), None, ValueError, "sum_sq must be contiguous"),
    ],
)
def test_moments_errors(sum_g, sum_sq, grads, weights, exc, match):
    from fastattr.kernels.triton_step_sums import moments_triton

    with pytest.raises(exc, match=match):
        moments_triton(sum_g.to(DEVICE), sum_sq.to(DEVICE), grads.to(DEVICE), None if weights is None else weights.to(DEVICE))


# --------------------------------------------------------------------------- channel_reduce

SHAPES = [(3, 5, 7), (2, 600, 3), (2, 3, 9, 11), (3, 2, 5, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("mode", ["sum", "abs", "l2"])
def test_channel_reduce(poison_empty, dtype, shape, dim, mode):
    g = _gen("cr", dtype, shape, dim, mode)
    x = _randn(g, *shape, dtype=dtype)
    ref = reference.channel_reduce(x.double(), dim, mode)
    out = channel_reduce(x, dim, mode, backend="triton")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not out.isnan().any()
    # fp32 summation error is bounded relative to sum |x|, not to a cancelling sum
    scale = reference.channel_reduce(x.double(), dim, "abs")
    if mode == "sum":
        assert ((out.double() - ref).abs() <= 1e-5 * scale + 1e-6).all()
    else:
        _close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, -1])
def test_channel_reduce_out_dtype(poison_empty, dtype, out_dtype, dim):
    g = _gen("cr-out", dtype, out_dtype, dim)
    x = _randn(g, 2, 3, 4, 5, dtype=dtype)
    ref = reference.channel_reduce(x.double(), dim, "l2")
    out = channel_reduce(x, dim, "l2", out_dtype=out_dtype, backend="triton")
    assert out.dtype == out_dtype and not out.isnan().any()
    _close(out, ref.to(out_dtype), rtol=_CAST_RTOL[out_dtype], atol=1e-6)


def test_channel_reduce_default_dtype_and_empty():
    x = torch.ones(2, 0, 3, device=DEVICE)
    out = channel_reduce(x, 1, "sum", backend="triton")
    assert out.shape == (2, 3) and not out.any()
    assert channel_reduce(torch.ones(0, 3, device=DEVICE), 1, backend="triton").shape == (0,)
    half = torch.ones(2, 3, device=DEVICE, dtype=torch.bfloat16)
    assert channel_reduce(half, 0, backend="triton").dtype == torch.float32
    assert math.isclose(channel_reduce(half, 0, "l2", backend="triton")[0].item(), math.sqrt(2), rel_tol=1e-6)
    vec = torch.arange(5.0, device=DEVICE)  # 1-d: reduces to a 0-d tensor
    out = channel_reduce(vec, -1, "abs", backend="triton")
    assert out.shape == () and out.item() == 10.0


@pytest.mark.parametrize(
    "x, dim, mode, kwargs, exc, match",
    [
        (torch.zeros(2, 3), 2, "sum", {}, ValueError, r"dim must be in \[-2, 2\)"),
        (torch.zeros(2, 3), -3, "sum", {}, ValueError, "dim must be in"),
        (torch.zeros(2, 3), 0, "max", {}, ValueError, "mode must be"),
        (torch.zeros(2, 3, dtype=torch.int32), 0, "sum", {}, TypeError, "x must be float32"),
        (torch.zeros(2, 3), 0, "sum", {"out_dtype": torch.int64}, TypeError, "out_dtype must be"),
        (torch.zeros(3, 2).t(), 0, "sum", {}, ValueError, "x must be contiguous"),
    ],
)
def test_channel_reduce_errors(x, dim, mode, kwargs, exc, match):
    from fastattr.kernels.triton_channel_reduce import channel_reduce_triton

    with pytest.raises(exc, match=match):
        channel_reduce_triton(x.to(DEVICE), dim, mode, **kwargs)


# --------------------------------------------------------------------------- dispatch


def test_resolve_backend(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("FASTATTR_KERNELS", raising=False)
    assert kernels.resolve_backend(None, t) == "torch"  # auto on a CPU tensor
    assert kernels.resolve_backend("torch", t) == "torch"
    assert kernels.resolve_backend("triton", t) == "triton"
    monkeypatch.setenv("FASTATTR_KERNELS", "torch")
    assert kernels.resolve_backend(None, t) == "torch"
    monkeypatch.setenv("FASTATTR_KERNELS", "triton")
    assert kernels.resolve_backend(None, t) == "triton"
    assert kernels.resolve_backend("torch", t) == "torch"  # the argument wins over the env
    monkeypatch.setenv("FASTATTR_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FASTATTR_KERNELS"):
        kernels.resolve_backend(None, t)


def test_env_selects_triton_and_torch(monkeypatch):
    g = _gen("env")
    x = _randn(g, 3, 7, 5)
    ref = reference.channel_reduce(x, 1, "abs")
    monkeypatch.setenv("FASTATTR_KERNELS", "torch")
    assert torch.equal(channel_reduce(x, 1, "abs"), ref)  # the reference itself
    monkeypatch.setenv("FASTATTR_KERNELS", "triton")
    _close(channel_reduce(x, 1, "abs"), ref)
    acc = _randn(g, 3, 7)
    attr_t, stats_t = finalize(acc, backend="torch")
    attr_r, stats_r = reference.finalize(acc)
    assert torch.equal(attr_t, attr_r) and all(torch.equal(a, b) for a, b in zip(stats_t, stats_r, strict=True))


def test_dispatch_names_survive_kernel_import():
    """fastattr.kernels.<op> must stay the dispatch function after the Triton module is imported."""
    import importlib

    for name in ("path_accumulate", "finalize", "moments", "channel_reduce"):
        importlib.import_module(f"fastattr.kernels.{kernels._TRITON_MODULES[name]}")
        assert callable(getattr(kernels, name)), f"fastattr.kernels.{name} was rebound to the submodule"


# --------------------------------------------------------------------------- one kernel, shared settings


@pytest.mark.parametrize("per_row", [False, True])
def test_path_accumulate_is_moments_first_sum(per_row):
    """path_accumulate runs the moments kernel without its second sum: bit-identical first sums,
    and nothing else written."""
    from fastattr.kernels import triton_step_sums

    g = _gen("pa-mom", per_row)
    S, B, F = 5, 3, 1531
    acc = _randn(g, B, F)
    grads = _randn(g, S, B, F, dtype=torch.bfloat16)
    weights = _randn(g, *((S, B) if per_row else (S,)))
    sum_g, sum_sq = acc.clone(), torch.zeros(B, F, device=DEVICE)
    moments(sum_g, sum_sq, grads, weights, backend="triton")
    before = acc.clone()
    path_accumulate(acc, grads, weights, backend="triton")
    assert torch.equal(acc, sum_g)
    _close(acc, reference.path_accumulate(before.double(), grads.double(), weights.double()))
    kernels_in_module = [v for v in vars(triton_step_sums).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    assert len(kernels_in_module) == 1, kernels_in_module


def test_launch_settings_shared(monkeypatch):
    """Every launcher takes its block size and grid from kernels/launch.py: shrink the blocks there
    and every op still matches its reference, through the multi-block paths, on fresh random inputs."""
    from fastattr.kernels import launch

    monkeypatch.setattr(launch, "BLOCK_F", 16)
    monkeypatch.setattr(launch, "TILE", 32)
    calls = []
    real_row_tiles = launch.row_tiles
    monkeypatch.setattr(launch, "row_tiles", lambda B, F: calls.append((B, F)) or real_row_tiles(B, F))
    g = torch.Generator()
    print(f"seed {g.seed()}")  # fresh draws every run; shown on failure
    B, F, S = 3, 37, 4
    acc, grads, w = _randn(g, B, F), _randn(g, S, B, F), _randn(g, S, B).abs()
    ref = reference.path_accumulate(acc.double(), grads.double(), w.double())
    _close(path_accumulate(acc.clone(), grads, w, backend="triton"), ref)
    r1, r2 = reference.moments(acc.double(), acc.double().abs(), grads.double())
    o1, o2 = moments(acc.clone(), acc.abs(), grads, backend="triton")
    _close(o1, r1)
    _close(o2, r2)
    x = _randn(g, B, F)
    ref_attr, ref_stats = reference.finalize(acc.double(), x.double())
    attr, stats = finalize(acc, x, backend="triton")
    _close(attr, ref_attr)
    _check_stats(stats, ref_stats)
    assert calls == [(B, F)] * 3  # path_accumulate, moments, finalize
    for shape, dim in (((2, 5, 40), 1), ((3, 100), 1)):  # mid (inner 40 > TILE / 2) and last-dim paths
        xr = _randn(g, *shape)
        _close(channel_reduce(xr, dim, "l2", backend="triton"), reference.channel_reduce(xr.double(), dim, "l2"))
