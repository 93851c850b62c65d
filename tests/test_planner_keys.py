"""Row sizes remembered between passes are keyed by the model's identity, never by a reusable id().

budget._settled keeps the rows a pass settled on, so the next call with the same model and row
shapes skips tuning. Keyed by id(model), a new model allocated where a freed one lived (CPython
reuses the address at once) inherited the freed model's rows: on CUDA a larger model would then
run out of memory. budget.identity gives every object its own token for as long as it lives."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastattr
from fastattr import budget

pytestmark = pytest.mark.usefixtures("single_thread")


def _reused_id_pair():
    """Two objects alive one after the other at the same address, or None if CPython did not reuse it."""
    for _ in range(50):
        first = nn.Linear(4, 3)
        old_id, old_key = id(first), budget.identity(first)
        del first  # no gc.collect(): its own allocations would take the freed address
        second = nn.Linear(4, 3)
        if id(second) == old_id:
            return old_key, second
    return None


def test_identity_is_not_reused_with_the_address():
    pair = _reused_id_pair()
    if pair is None:
        pytest.skip("CPython did not reuse the address within 50 tries")
    old_key, second = pair
    assert budget.identity(second) != old_key
    assert budget.identity(second) == budget.identity(second)  # stable while it lives
    assert budget.identity(second.forward) == budget.identity(second.forward)  # a new method object each access


def test_a_new_model_at_a_freed_models_address_tunes_afresh(monkeypatch):
    """Fails on id() keys: the second model found the first one's settled rows and skipped tuning.
    Deterministic: every object gets the same id() here, as a model allocated at a freed one's
    address does (CPython reuses addresses at once, but not on every run of the suite)."""
    from fastattr import engine

    monkeypatch.setattr(budget, "_settled", {})
    monkeypatch.setattr(budget, "_progress", {})
    monkeypatch.setattr(engine, "id", lambda obj: 4242, raising=False)  # the engine's module-level id()
    x = torch.randn(64, 4)
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(4, 3))
    fastattr.IntegratedGradients(first).attribute(x, target=0, n_steps=32)  # tuned rows: settled or in progress
    keys = set(budget._settled) | set(budget._progress)
    assert keys
    created = []
    real = budget.RowPlanner.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        created.append(self.key in keys)

    monkeypatch.setattr(budget.RowPlanner, "__init__", spy)
    second = nn.Sequential(nn.Linear(4, 3))
    fastattr.IntegratedGradients(second).attribute(x, target=0, n_steps=32)
    assert created and not any(created), "the new model's planner found the first model's settled rows"
