"""A small transformer text classifier and padded variable-length token batches, for the
layer-attribution tests; defined once in benchmarks/models.py (loaded by tests/_bench_models.py).

The encoder is written out (no nn.TransformerEncoderLayer): torch's fused inference fast
path turns padded positions into zeros under no_grad but not under autograd, which would
make forward-only and gradient passes disagree at the padding.
"""

from __future__ import annotations

import torch
from _bench_models import models as _models

PAD = _models.PAD  # token id of padding (also the default zero baseline)
Block = _models.Block
TokenClassifier = _models.TokenClassifier
token_batch = _models.token_batch


class RowCounter(torch.nn.Module):
    """Wraps a model and records the rows of every forward it receives."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows: list[int] = []

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.rows.append(args[0].shape[0])
        return self.model(*args)


class Reused(torch.nn.Module):
    """Calls the same Linear twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lin(torch.tanh(self.lin(x))))
