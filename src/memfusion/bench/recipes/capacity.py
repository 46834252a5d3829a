"""The Hopfield capacity recipe: modern vs classical Hopfield retrieval of random ±1 patterns (no training).

For each number of stored patterns in ``counts``, ``memories`` independent memories each store that
many random ±1 patterns of ``dim`` components; every stored pattern is probed once with
``flip_fraction`` of its signs flipped (:class:`~memfusion.bench.tasks.associative.HopfieldPatterns`).
A probe counts as retrieved when the signs of the retrieved state equal the stored pattern's.

- modern (Ramsauer et al. 2020): one update ``xi <- Y^T softmax(beta Y xi)`` with the stored patterns
  as keys and values (:func:`~memfusion.neural.hopfield.hopfield_associate`), inverse temperature ``beta``;
- classical (Hopfield 1982): Hebbian weights, asynchronous sign updates until a fixed point or
  ``classical_sweeps`` sweeps (:class:`~memfusion.neural.hopfield.ClassicalHopfield`).

Both see the same patterns and probes (one seeded draw per count). Metrics: ``modern@N`` and
``classical@N``, the fraction of probes retrieved with ``N`` stored patterns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from memfusion.bench.recipes.base import need
from memfusion.bench.tasks.associative import capacity_curve
from memfusion.bench.train import Problem
from memfusion.neural.hopfield import ClassicalHopfield, ClassicalHopfieldConfig, hopfield_associate


@dataclasses.dataclass(frozen=True)
class CapacityOptions:
    """dim ``D``, flip_fraction of each probe's signs flipped, counts of stored patterns swept, beta
    of the modern update, memories (independent memories per count), classical_sweeps (the most
    asynchronous sweeps of the classical network)."""

    dim: int = 128
    flip_fraction: float = 0.2
    counts: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000)
    beta: float = 1.0
    memories: int = 4
    classical_sweeps: int = 100

    def __post_init__(self) -> None:
        for name in ("dim", "memories", "classical_sweeps"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"option {name} must be an integer >= 1, got {v!r}")
        need(0 <= self.flip_fraction <= 1, f"option flip_fraction must be in [0, 1], got {self.flip_fraction}")
        need(self.beta > 0, f"option beta must be > 0, got {self.beta}")
        need(
            len(self.counts) >= 1 and all(c >= 1 for c in self.counts),
            f"option counts must be numbers of patterns >= 1, e.g. 10,100,1000; got {self.counts}",
        )


class CapacityProblem(Problem):
    """Evaluation only: ``model`` has no parameters (run with steps = 0)."""

    def __init__(self, options: CapacityOptions, seed: int, device: torch.device) -> None:
        self.model = nn.Module()
        self.options, self.seed, self.device = options, seed, device
        self.classical = ClassicalHopfield(
            ClassicalHopfieldConfig(size=options.dim, synchronous=False, max_sweeps=options.classical_sweeps)
        )

    def modern(self, patterns: Tensor, probes: Tensor) -> Tensor:
        """patterns (B, P, D), probes (B, Q, D) -> retrieved (B, Q, D): one modern Hopfield update."""
        stored = patterns.to(self.device)[:, None]  # (B, 1, P, D): one head
        z, _ = hopfield_associate(probes.to(self.device)[:, None], stored, stored, self.options.beta)  # (B, 1, Q, D)
        return z[:, 0].cpu()  # (B, Q, D)

    def classic(self, patterns: Tensor, probes: Tensor) -> Tensor:
        """patterns (B, P, D), probes (B, Q, D) -> final states (B, Q, D); one network per memory."""
        g = torch.Generator().manual_seed(self.seed)
        out = [self.classical(probes[b], self.classical.store(patterns[b]), g) for b in range(patterns.shape[0])]
        return torch.stack(out)  # (B, Q, D)

    def batch(self, batch_size: int, generator: torch.Generator, step: int) -> Any:
        raise NotImplementedError("the Hopfield capacity recipe has nothing to train")

    def loss(self, batch: Any) -> Tensor:
        raise NotImplementedError("the Hopfield capacity recipe has nothing to train")

    def evaluate(self) -> dict[str, float]:
        o = self.options
        out: dict[str, float] = {}
        for name, retrieve in (("modern", self.modern), ("classical", self.classic)):
            curve = capacity_curve(retrieve, o.counts, o.dim, o.flip_fraction, o.memories, self.seed)
            out.update({f"{name}@{n}": acc for n, acc in curve})
        return out


def capacity_setup(options: CapacityOptions, seed: int, device: torch.device) -> Problem:
    return CapacityProblem(options, seed, device)
