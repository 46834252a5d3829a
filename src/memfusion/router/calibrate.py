"""Calibrating the retrieval threshold: the similarity above which the store's best hit is worth
putting in context.

Input: for each validation question, the best hit's cosine similarity and whether that hit holds
the answer (``True``: the question is about a stored fact; ``False``: it is not, so the best hit is
a wrong fact). :func:`fit_threshold` picks the threshold that maximises balanced accuracy (the
mean of the true-positive and true-negative rates, so an unbalanced set does not pull it), ties
broken towards the widest margin: the midpoint between the neighbouring scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from memfusion.errors import InvalidInput


@dataclass(frozen=True)
class Calibration:
    """The fitted threshold and how it separates the validation set."""

    threshold: float
    balanced_accuracy: float
    true_positive_rate: float
    true_negative_rate: float
    n_positive: int
    n_negative: int


def fit_threshold(scores: Sequence[float], labels: Sequence[bool]) -> Calibration:
    """The threshold ``t`` maximising balanced accuracy of ``score >= t`` against ``labels``."""
    if len(scores) != len(labels) or not scores:
        raise InvalidInput(f"fit_threshold needs as many labels as scores (> 0), got {len(scores)} and {len(labels)}")
    if any(not (-1.0 - 1e-6 <= s <= 1.0 + 1e-6) for s in scores):
        raise InvalidInput("scores are cosine similarities in [-1, 1]")
    pos = sum(bool(y) for y in labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise InvalidInput("calibration needs questions whose fact is stored and questions whose fact is not")
    values = sorted(set(scores))
    # candidate thresholds: below everything, between neighbours, above everything
    candidates = [values[0] - 1e-3, *((a + b) / 2 for a, b in itertools.pairwise(values)), values[-1] + 1e-3]
    best: Calibration | None = None
    for t in candidates:
        tp = sum(1 for s, y in zip(scores, labels, strict=True) if y and s >= t)
        tn = sum(1 for s, y in zip(scores, labels, strict=True) if not y and s < t)
        cal = Calibration(t, (tp / pos + tn / neg) / 2, tp / pos, tn / neg, pos, neg)
        if best is None or cal.balanced_accuracy > best.balanced_accuracy + 1e-12:
            best = cal
    assert best is not None  # candidates is never empty
    return best
