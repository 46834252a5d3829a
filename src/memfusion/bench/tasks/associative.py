"""Stored random ±1 patterns and corrupted probes: the Hopfield capacity curve.

A batch holds ``B`` independent memories, each of ``n_patterns`` random patterns in {-1, +1}^D
(each sign fair and independent); every stored pattern gets ``probes_per_pattern`` probes, copies
of it with exactly ``round(flip_fraction * D)`` signs flipped at distinct random positions. A
retrieval ``(patterns (B, P, D), probes (B, Q, D)) -> (B, Q, D)`` is scored by the fraction of
probes whose retrieved state has exactly the stored pattern's signs (:func:`recall_accuracy`);
:func:`capacity_curve` sweeps the number of stored patterns (classical Hopfield networks recall
reliably up to about ``0.14 D`` patterns, modern ones exponentially many).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from memfusion.errors import InvalidInput


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclasses.dataclass(frozen=True)
class PatternBatch:
    """patterns: (B, P, D) float in {-1, +1}; probes: (B, Q, D) float in {-1, +1}; targets: (B, Q)
    long, the stored pattern each probe corrupts. Invariant: probe ``q`` differs from
    ``patterns[b, targets[b, q]]`` in exactly ``flips`` positions."""

    patterns: Tensor
    probes: Tensor
    targets: Tensor
    flips: int


@dataclasses.dataclass(frozen=True)
class HopfieldPatterns:
    """The generator's sizes: D = ``dim``, P = ``n_patterns``, Q = P * ``probes_per_pattern``."""

    dim: int = 100
    n_patterns: int = 10
    flip_fraction: float = 0.1
    probes_per_pattern: int = 1

    def __post_init__(self) -> None:
        _need(self.dim >= 1, f"dim must be >= 1, got {self.dim}")
        _need(self.n_patterns >= 1, f"n_patterns must be >= 1, got {self.n_patterns}")
        _need(0.0 <= self.flip_fraction <= 1.0, f"flip_fraction must lie in [0, 1], got {self.flip_fraction}")
        _need(self.probes_per_pattern >= 1, f"probes_per_pattern must be >= 1, got {self.probes_per_pattern}")

    @property
    def flips(self) -> int:
        return round(self.flip_fraction * self.dim)

    def batch(self, batch_size: int, generator: torch.Generator) -> PatternBatch:
        _need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        b, p, d, k = batch_size, self.n_patterns, self.dim, self.probes_per_pattern
        patterns = torch.randint(0, 2, (b, p, d), generator=generator).float() * 2 - 1  # (B, P, D)
        targets = torch.arange(p).repeat_interleave(k).expand(b, p * k).clone()  # (B, Q)
        clean = patterns.gather(1, targets[..., None].expand(b, p * k, d))  # (B, Q, D)
        rank = (
            torch.rand(b, p * k, d, generator=generator).argsort(dim=-1).argsort(dim=-1)
        )  # (B, Q, D) a random rank per position
        flip = rank < self.flips  # (B, Q, D) exactly `flips` True per probe
        probes = torch.where(flip, -clean, clean)
        return PatternBatch(patterns, probes, targets, self.flips)


def recall_accuracy(retrieved: Tensor, batch: PatternBatch) -> float:
    """The fraction of probes whose retrieved state's signs equal the stored pattern's (a zero
    component counts as wrong)."""
    _need(
        retrieved.shape == batch.probes.shape,
        f"retrieved must have the probes' shape {tuple(batch.probes.shape)}, got {tuple(retrieved.shape)}",
    )
    b, q, d = batch.probes.shape
    truth = batch.patterns.gather(1, batch.targets[..., None].expand(b, q, d))  # (B, Q, D)
    return float((torch.sign(retrieved) == truth).all(dim=-1).double().mean())


def capacity_curve(
    retrieve: Callable[[Tensor, Tensor], Tensor],
    counts: Sequence[int],
    dim: int = 100,
    flip_fraction: float = 0.1,
    batch_size: int = 8,
    seed: int = 0,
) -> list[tuple[int, float]]:
    """``(n_patterns, recall accuracy)`` for each number of stored patterns in ``counts``.

    ``retrieve(patterns (B, P, D), probes (B, Q, D)) -> (B, Q, D)``; every count draws a fresh
    batch from a generator seeded with ``seed`` and the count, so the curve is reproducible.
    """
    _need(len(counts) >= 1, "counts must name at least one number of patterns")
    curve = []
    for n in counts:
        task = HopfieldPatterns(dim=dim, n_patterns=n, flip_fraction=flip_fraction)
        batch = task.batch(batch_size, torch.Generator().manual_seed(seed * 1_000_003 + n))
        curve.append((int(n), recall_accuracy(retrieve(batch.patterns, batch.probes), batch)))
    return curve
