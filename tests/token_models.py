"""A small transformer text classifier and padded variable-length token batches, for the
layer-attribution tests (benchmarks/models.py keeps its own copy for bench_layer.py).

The encoder is written out (no nn.TransformerEncoderLayer): torch's fused inference fast
path turns padded positions into zeros under no_grad but not under autograd, which would
make forward-only and gradient passes disagree at the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD = 0  # token id of padding (also the default zero baseline)


class Block(nn.Module):
    """Pre-LN encoder block: masked multi-head self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + key_bias  # (b, heads, t, t)
        att = scores.softmax(-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class TokenClassifier(nn.Module):
    """forward(ids (B, T) long, mask (B, T) 1/0) -> (B, classes) logits.

    nn.Embedding (``embed``, the layer to attribute) + learned positions -> blocks with
    padded keys masked out -> mean over real tokens -> linear head.
    """

    def __init__(
        self,
        vocab: int = 50,
        dim: int = 32,
        heads: int = 4,
        layers: int = 2,
        classes: int = 3,
        max_len: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        m = mask.to(h.dtype)
        key_bias = ((1 - m) * -1e4)[:, None, None, :]  # padded keys get no attention
        for block in self.blocks:
            h = block(h, key_bias)
        h = self.norm(h)
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        return self.head(F.gelu(pooled))


def token_batch(
    batch: int, max_len: int, vocab: int = 50, min_len: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) long, mask (B, T) float 1/0, lengths (B,) long): random lengths in
    [min_len, max_len], real tokens in [1, vocab), PAD after each row's length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len  # at least one full row
    ids = torch.randint(1, vocab, (batch, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).float()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
    return ids, mask, lengths


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
