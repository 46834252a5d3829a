"""Calibrating the retrieval threshold: the similarity above which the store's best hit is worth
putting in context.

Input: for each validation question, the best hit's cosine similarity and whether that hit holds
the answer (``True``: the question is about a stored fact; ``False``: it is not, so the best hit is
a wrong fact). :func:`fit_threshold` picks the threshold that maximises balanced accuracy (the
mean of the true-positive and true-negative rates, so an unbalanced set does not pull it), ties
broken towards the widest margin: the midpoint between the neighbouring scores.

:func:`fit_margin` then fits how many of the retrieved facts go into context: a fact whose
similarity is within ``margin`` of the best hit's goes in. Input: for each validation question
about a stored fact, its top hits' gaps to the best similarity and which hit (if any) holds the
answer. A context of ``m`` facts, one of them the answer, is credited ``1 / m`` (a reader that
cannot tell their keys apart picks one at random; the reference model is such a reader), and the
margin maximising the mean credit wins, again at the midpoint of its winning interval.
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


@dataclass(frozen=True)
class MarginCalibration:
    """The fitted margin, its mean credit (see the module docstring) and the mean facts kept."""

    margin: float
    credit: float
    mean_kept: float
    n_questions: int


def fit_margin(gaps: Sequence[Sequence[float]], answer: Sequence[int | None]) -> MarginCalibration:
    """The margin maximising the mean credit; ``gaps[q]``: ``best - score`` of question ``q``'s hits in
    rank order (``gaps[q][0] == 0``); ``answer[q]``: the index of the hit holding the answer, or None."""
    if len(gaps) != len(answer) or not gaps:
        raise InvalidInput(f"fit_margin needs one answer index per question (> 0), got {len(gaps)} and {len(answer)}")
    for g, a in zip(gaps, answer, strict=True):
        if not g or abs(g[0]) > 1e-9 or any(x < -1e-9 for x in g) or (a is not None and not 0 <= a < len(g)):
            raise InvalidInput("each question needs its hits' gaps to the best (the first 0, none negative)")
    values = sorted({float(x) for g in gaps for x in g})

    def credit(m: float) -> tuple[float, float]:
        total = kept_total = 0.0
        for g, a in zip(gaps, answer, strict=True):
            kept = sum(1 for x in g if x <= m)
            kept_total += kept
            total += 1.0 / kept if a is not None and g[a] <= m else 0.0
        return total / len(gaps), kept_total / len(gaps)

    best_i, best = 0, credit(values[0])
    for i in range(1, len(values)):
        c = credit(values[i])
        if c[0] > best[0] + 1e-12:
            best_i, best = i, c
    lo = values[best_i]
    hi = values[best_i + 1] if best_i + 1 < len(values) else min(2.0, lo + 1e-3)
    mid = (lo + hi) / 2
    return MarginCalibration(mid if lo <= mid < hi else lo, best[0], best[1], len(gaps))  # subnormal gaps round
