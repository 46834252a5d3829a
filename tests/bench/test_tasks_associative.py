"""Random ±1 patterns and corrupted probes for the Hopfield capacity curve."""

from __future__ import annotations

import math

import pytest
import torch

from memfusion.bench.tasks.associative import HopfieldPatterns, PatternBatch, capacity_curve, recall_accuracy
from memfusion.errors import InvalidInput


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_patterns_and_probes() -> None:
    task = HopfieldPatterns(dim=64, n_patterns=7, flip_fraction=0.2, probes_per_pattern=3)
    b = task.batch(5, gen(0))
    assert b.patterns.shape == (5, 7, 64) and b.probes.shape == (5, 21, 64) and b.targets.shape == (5, 21)
    assert set(b.patterns.unique().tolist()) == {-1.0, 1.0} and set(b.probes.unique().tolist()) == {-1.0, 1.0}
    assert b.flips == round(0.2 * 64) == 13
    for r in range(5):
        assert sorted(b.targets[r].tolist()) == sorted(list(range(7)) * 3)
        for q in range(21):
            stored = b.patterns[r, int(b.targets[r, q])].tolist()
            probe = b.probes[r, q].tolist()
            assert sum(1 for s, p in zip(stored, probe, strict=True) if s != p) == 13
    # different probes of one pattern flip different positions
    flipped = b.patterns[0, b.targets[0]] != b.probes[0]  # (21, 64)
    assert len({tuple(f) for f in flipped.tolist()}) == 21


def test_signs_are_fair() -> None:
    b = HopfieldPatterns(dim=200, n_patterns=50).batch(10, gen(1))
    n = b.patterns.numel()
    assert abs(b.patterns.mean().item()) < 4 / math.sqrt(n)


def test_seeded() -> None:
    task = HopfieldPatterns()
    a, b, c = task.batch(2, gen(3)), task.batch(2, gen(3)), task.batch(2, gen(4))
    assert torch.equal(a.patterns, b.patterns) and torch.equal(a.probes, b.probes)
    assert not torch.equal(a.patterns, c.patterns)


def test_zero_flips_gives_clean_probes() -> None:
    b = HopfieldPatterns(dim=30, n_patterns=4, flip_fraction=0.0).batch(2, gen(0))
    assert torch.equal(b.probes, b.patterns)


def test_recall_accuracy_hand_computed() -> None:
    patterns = torch.tensor([[[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]])  # (1, 2, 3)
    targets = torch.tensor([[0, 1, 1, 0]])
    batch = PatternBatch(patterns, patterns[:, targets[0]], targets, 0)
    retrieved = torch.tensor([[[0.3, -2.0, 0.1], [-1.0, -1.0, -1.0], [-0.5, -0.5, 0.5], [1.0, 0.0, 1.0]]])
    # right, wrong sign, right, a zero component (wrong)
    assert recall_accuracy(retrieved, batch) == 0.5
    with pytest.raises(InvalidInput, match="shape"):
        recall_accuracy(retrieved[:, :2], batch)


def nearest(patterns: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """An oracle: the stored pattern with the largest overlap."""
    best = torch.einsum("bqd,bpd->bqp", probes, patterns).argmax(-1)  # (B, Q)
    return patterns.gather(1, best[..., None].expand_as(probes))


def hebbian(patterns: torch.Tensor, probes: torch.Tensor, sweeps: int = 10) -> torch.Tensor:
    """The classical Hopfield network: W = X^T X / D with a zero diagonal, synchronous sign updates."""
    d = patterns.shape[-1]
    w = torch.einsum("bpi,bpj->bij", patterns, patterns) / d
    w = w * (1 - torch.eye(d))
    state = probes.clone()
    for _ in range(sweeps):
        field = torch.einsum("bij,bqj->bqi", w, state)
        state = torch.where(field >= 0, 1.0, -1.0)
    return state


def test_capacity_curve_with_an_oracle_and_a_classical_network() -> None:
    counts = [2, 5, 10, 40]
    oracle = capacity_curve(nearest, counts, dim=100, flip_fraction=0.1, batch_size=4)
    assert oracle == [(n, 1.0) for n in counts]
    classical = dict(capacity_curve(hebbian, counts, dim=100, flip_fraction=0.1, batch_size=4))
    assert classical[2] == 1.0 and classical[5] > 0.9  # well under the ~0.14 D capacity
    assert classical[40] < 0.1  # far over it
    assert classical[2] >= classical[10] >= classical[40]
    assert capacity_curve(hebbian, counts, dim=100, batch_size=4) == list(classical.items())


def test_bad_input() -> None:
    with pytest.raises(InvalidInput, match="dim"):
        HopfieldPatterns(dim=0)
    with pytest.raises(InvalidInput, match="n_patterns"):
        HopfieldPatterns(n_patterns=0)
    with pytest.raises(InvalidInput, match="flip_fraction"):
        HopfieldPatterns(flip_fraction=1.5)
    with pytest.raises(InvalidInput, match="probes_per_pattern"):
        HopfieldPatterns(probes_per_pattern=0)
    with pytest.raises(InvalidInput, match="batch_size"):
        HopfieldPatterns().batch(0, gen(0))
    with pytest.raises(InvalidInput, match="counts"):
        capacity_curve(nearest, [])
