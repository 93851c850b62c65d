"""The one-pass all-finite check (a finite sum proves every value finite) must never change a
result: values whose sum overflows fall back to the exact check, and NaN/inf are still found."""

from __future__ import annotations

import pytest
import torch
from fastattr.kernels import reference

from fastattr.errors import AttributionInputError
from fastattr.inputs import check_inputs
from fastattr.run_inputs import _bad_rows


def test_overflowing_sum_of_finite_values_is_not_an_error():
    big = torch.full((4, 1000), 3e38)  # every value finite, the sum is inf
    assert not torch.isfinite(big.sum())
    assert check_inputs((big,), need_float=True, allow_nonfinite=False) == 4
    assert not _bad_rows(big).any()
    _, stats = reference.finalize(big.clone())
    assert stats.nonfinite.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_values_are_still_found(bad):
    x = torch.randn(4, 50)
    x[2, 7] = bad
    with pytest.raises(AttributionInputError):
        check_inputs((x,), need_float=True, allow_nonfinite=False)
    assert _bad_rows(x).tolist() == [False, False, True, False]
    attr, stats = reference.finalize(x.clone())
    assert stats.nonfinite.tolist() == [0, 0, 1, 0]
    assert torch.isfinite(stats.sum).all() and torch.isfinite(stats.l2).all()  # stats over finite values only
    assert attr[2, 7].item() != attr[2, 7].item() or attr[2, 7].item() == bad  # stored as given


def test_all_finite_stats_match_the_masked_computation():
    x = torch.randn(8, 300, dtype=torch.float64)
    _, stats = reference.finalize(x.clone())
    assert torch.allclose(stats.sum.double(), x.sum(1).float().double())
    assert torch.allclose(stats.l1.double(), x.abs().sum(1).float().double())
    assert stats.nonfinite.dtype == torch.int32 and stats.nonfinite.sum() == 0


def _old_finalize(acc: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The reference finalize of plain accumulators as it was (separate temporaries, always a copy)."""
    finite = torch.isfinite(acc)
    clean = torch.where(finite, acc, torch.zeros(()))
    absval = clean.abs()
    return acc.clone(), (clean.sum(1), absval.sum(1), clean.square().sum(1).sqrt(), absval.amax(1), (~finite).sum(1, dtype=torch.int32))


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_finalize_without_temporaries_gives_the_same_bits(bad):
    acc = torch.randn(6, 3001) * 1e3
    if bad is not None:
        acc[1, 5] = bad
    want_attr, want = _old_finalize(acc)
    attr, stats = reference.finalize(acc.clone())
    assert attr.data_ptr() != acc.data_ptr()  # a copy by default: callers may reuse the accumulator
    assert torch.equal(attr.nan_to_num(), want_attr.nan_to_num())
    for got, old in zip(stats, want):
        assert got.numpy().tobytes() == old.numpy().tobytes()
    shared, _ = reference.finalize(acc, copy=False)  # copy=False: may be acc itself
    assert shared.data_ptr() == acc.data_ptr()


@pytest.mark.parametrize("weights", [torch.ones(1), torch.tensor([0.3]), torch.ones(1, 5)])
def test_one_step_accumulate_matches_einsum_bit_for_bit(weights):
    acc = torch.randn(5, 777)
    grads = torch.randn(1, 5, 777)
    want = acc + torch.einsum("s,sbf->bf" if weights.dim() == 1 else "sb,sbf->bf", weights, grads)
    got = reference.path_accumulate(acc.clone(), grads, weights)
    assert got.numpy().tobytes() == want.numpy().tobytes()
