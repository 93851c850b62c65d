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
