from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfusion.errors import InvalidInput
from memfusion.router import fit_threshold


def _balanced(scores: list[float], labels: list[bool], t: float) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    return (sum(s >= t for s in pos) / len(pos) + sum(s < t for s in neg) / len(neg)) / 2


def test_separable_sets_get_a_threshold_between_the_classes() -> None:
    cal = fit_threshold([0.9, 0.8, 0.75, 0.3, 0.2, 0.4], [True, True, True, False, False, False])
    assert cal.balanced_accuracy == 1.0
    assert cal.threshold == pytest.approx((0.75 + 0.4) / 2)
    assert (cal.n_positive, cal.n_negative) == (3, 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1, 1), st.booleans()), min_size=2, max_size=40))
def test_no_threshold_on_a_fine_grid_does_better(pairs: list[tuple[float, bool]]) -> None:
    scores, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    if all(labels) or not any(labels):
        with pytest.raises(InvalidInput):
            fit_threshold(scores, labels)
        return
    cal = fit_threshold(scores, labels)
    assert cal.balanced_accuracy == pytest.approx(_balanced(scores, labels, cal.threshold))
    grid = [i / 500 - 1 for i in range(1001)] + scores
    assert max(_balanced(scores, labels, t) for t in grid) <= cal.balanced_accuracy + 1e-12


def test_bad_input() -> None:
    with pytest.raises(InvalidInput):
        fit_threshold([0.1], [True, False])
    with pytest.raises(InvalidInput):
        fit_threshold([2.0, 0.1], [True, False])
    rng = random.Random(0)
    with pytest.raises(InvalidInput):
        fit_threshold([rng.random() for _ in range(5)], [True] * 5)
