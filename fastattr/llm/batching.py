"""Prompt + continuation sequences of several examples laid out in one padded batch.

Example i is its prompt p_i (L_i ids), the baseline prompt b_i (L_i ids) and its target
y_i (T_i ids). With teacher forcing, one sequence q_i = p_i + y_i[:-1] (n_i = L_i + T_i - 1
positions) gives every target's log-probability: y_i[t] is predicted at position L_i - 1 + t.
The baseline sequence is b_i + y_i[:-1], so only prompt positions differ from x (Captum
feeds the generated tokens unchanged too).

Rows are padded to S = max n_i, on the left (pads first, positions counted from the first
real token) or on the right (pads last: a causal model never sees them). Chunks of rows are
cut to the columns their own rows need (``span``), so a batch of short prompts does not pay
for its longest one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AttributionInputError

SIDES = ("left", "right")


@dataclass
class Example:
    prompt: torch.Tensor  # (L,) int64 prompt ids
    baseline: torch.Tensor  # (L,) int64 baseline ids (equal to the prompt where nothing is attributed)
    target: torch.Tensor  # (T,) int64 target ids, T >= 1
    keep: torch.Tensor  # (K,) int64 prompt positions reported (all, or Captum's itp_mask)
    input_tokens: list[str]  # K labels


@dataclass
class Layout:
    """The padded batch; every tensor on the model's device."""

    side: str
    ids: torch.Tensor  # (B, S) x's sequences
    base_ids: torch.Tensor  # (B, S) baseline sequences
    mask: torch.Tensor  # (B, S) 1 for real tokens
    positions: torch.Tensor  # (B, S) position ids (0 from each row's first real token; 0 on pads)
    offset: torch.Tensor  # (B,) columns of padding before row i's first token
    prompt_len: torch.Tensor  # (B,) L_i
    target_len: torch.Tensor  # (B,) T_i
    targets: torch.Tensor  # (B, Tmax) target ids, 0 past T_i
    t_valid: torch.Tensor  # (B, Tmax) bool

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def seq_len(self) -> torch.Tensor:
        return self.prompt_len + self.target_len - 1

    def target_cols(self) -> torch.Tensor:
        """(B, Tmax) column whose logits predict target t (clamped into range past T_i)."""
        t = torch.arange(self.targets.shape[1], device=self.ids.device)
        cols = self.offset[:, None] + self.prompt_len[:, None] - 1 + t[None, :]
        return cols.clamp(max=self.width - 1)

    def span(self, rows: torch.Tensor) -> tuple[int, int]:
        """Columns [c0, c1) that the examples ``rows`` need (all their real tokens)."""
        off = self.offset.index_select(0, rows)
        end = off + self.seq_len.index_select(0, rows)
        return int(off.min()), int(end.max())

    def padded(self, rows: torch.Tensor, c0: int, c1: int) -> bool:
        """Whether any of ``rows`` has padding inside columns [c0, c1)."""
        return bool((self.mask.index_select(0, rows)[:, c0:c1] == 0).any())

    def prompt_cols(self, keep: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Kmax) columns of each example's reported prompt positions (0 past K_i), and (B, Kmax) valid."""
        kmax = max(len(k) for k in keep)
        cols = torch.zeros(self.batch, kmax, dtype=torch.long, device=self.ids.device)
        valid = torch.zeros(self.batch, kmax, dtype=torch.bool, device=self.ids.device)
        for i, k in enumerate(keep):
            cols[i, : len(k)] = k.to(cols.device) + self.offset[i]
            valid[i, : len(k)] = True
        return cols, valid


def build_layout(examples: list[Example], side: str, pad_id: int, device: torch.device) -> Layout:
    if side not in SIDES:
        raise AttributionInputError(f"padding_side must be one of {SIDES}, got {side!r}")
    b = len(examples)
    seqs = [torch.cat([e.prompt, e.target[:-1]]) for e in examples]
    bases = [torch.cat([e.baseline, e.target[:-1]]) for e in examples]
    n = [len(s) for s in seqs]
    width = max(n)
    tmax = max(len(e.target) for e in examples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    base_ids = ids.clone()
    mask = torch.zeros((b, width), dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    offset = torch.zeros(b, dtype=torch.long)
    targets = torch.zeros((b, tmax), dtype=torch.long)
    t_valid = torch.zeros((b, tmax), dtype=torch.bool)
    for i, (s, s0, e) in enumerate(zip(seqs, bases, examples)):
        o = width - n[i] if side == "left" else 0
        offset[i] = o
        ids[i, o : o + n[i]] = s
        base_ids[i, o : o + n[i]] = s0
        mask[i, o : o + n[i]] = 1
        positions[i, o : o + n[i]] = torch.arange(n[i])
        targets[i, : len(e.target)] = e.target
        t_valid[i, : len(e.target)] = True
    lens = torch.tensor([len(e.prompt) for e in examples])
    tlens = torch.tensor([len(e.target) for e in examples])
    return Layout(
        side, ids.to(device), base_ids.to(device), mask.to(device), positions.to(device), offset.to(device),
        lens.to(device), tlens.to(device), targets.to(device), t_valid.to(device),
    )  # fmt: skip
