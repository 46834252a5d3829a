from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfusion.errors import InvalidInput
from memfusion.router import fit_margin, fit_threshold


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


def _credit(gaps: list[list[float]], answer: list[int | None], m: float) -> float:
    """Mean over questions of 1 / (facts kept) when the answer's fact is kept, literally."""
    total = 0.0
    for g, a in zip(gaps, answer, strict=True):
        kept = [j for j, x in enumerate(g) if x <= m]
        total += (1 / len(kept)) if a in kept else 0.0
    return total / len(gaps)


def test_margin_keeps_the_answer_and_leaves_out_the_lookalikes() -> None:
    # the answer is the best hit; lookalikes sit 0.2 and more below it, except in one question where
    # the answer is second, 0.05 below a wrong best hit
    gaps = [[0.0, 0.2, 0.3], [0.0, 0.25, 0.4], [0.0, 0.05, 0.3], [0.0, 0.22]]
    answer: list[int | None] = [0, 0, 1, 0]
    cal = fit_margin(gaps, answer)
    # margin < 0.05: credit (1 + 1 + 0 + 1) / 4; margin in [0.05, 0.2): (1 + 1 + 1/2 + 1) / 4 is better
    assert cal.credit == pytest.approx(3.5 / 4)
    assert cal.margin == pytest.approx((0.05 + 0.2) / 2)
    assert cal.mean_kept == pytest.approx((1 + 1 + 2 + 1) / 4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.floats(0, 1), min_size=0, max_size=5), st.integers(-1, 5)), min_size=1, max_size=20
    )
)
def test_no_margin_on_a_fine_grid_does_better(rows: list[tuple[list[float], int]]) -> None:
    gaps = [[0.0, *sorted(g)] for g, _ in rows]
    answer = [a if 0 <= a < len(g) else None for (_, a), g in zip(rows, gaps, strict=True)]
    cal = fit_margin(gaps, answer)
    assert cal.credit == pytest.approx(_credit(gaps, answer, cal.margin))
    grid = [i / 1000 for i in range(2001)] + [x for g in gaps for x in g]
    assert max(_credit(gaps, answer, m) for m in grid) <= cal.credit + 1e-12


def test_margin_bad_input() -> None:
    with pytest.raises(InvalidInput):
        fit_margin([], [])
    with pytest.raises(InvalidInput):
        fit_margin([[0.1, 0.2]], [0])  # the best hit's gap is 0
    with pytest.raises(InvalidInput):
        fit_margin([[0.0, 0.2]], [2])  # no third hit
