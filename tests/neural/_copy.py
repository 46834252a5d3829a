"""The 3-step copy smoke test shared by the recurrent memories' tests (NTM, DNC, MANN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memfusion.neural.base import SequenceMemory


def copy_batch(g: torch.Generator, b: int = 16, length: int = 3, bits: int = 4) -> tuple[Tensor, Tensor]:
    """Inputs (B, 2L+1, bits+1): the sequence, a delimiter, then L blank steps; targets (B, L, bits)."""
    seq = torch.randint(0, 2, (b, length, bits), generator=g).float()  # (B, L, bits)
    x = torch.zeros(b, 2 * length + 1, bits + 1)
    x[:, :length, :bits] = seq
    x[:, length, bits] = 1.0
    return x, seq


def assert_learns_three_step_copy(model: SequenceMemory, steps: int = 100, lr: float = 1e-2) -> None:
    """Fixed seed: the mean loss of the last 10 Adam steps is below 0.8x that of the first 10."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x, seq = copy_batch(g)
        y, _ = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(y[:, 4:], seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
