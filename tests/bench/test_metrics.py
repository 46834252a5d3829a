"""Metric definitions against values computed by hand."""

from __future__ import annotations

import math

import pytest

from memfusion.bench.metrics import retrieval_prf, summary, wilson
from memfusion.errors import InvalidInput


def test_summary_by_hand() -> None:
    s = summary([4.0, 1.0, 3.0, 2.0])
    assert (s.n, s.mean, s.median, s.min, s.max) == (4, 2.5, 2.5, 1.0, 4.0)
    assert s.var == pytest.approx(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # sample variance
    assert (s.p25, s.p75) == (1.75, 3.25)  # linear interpolation between order statistics
    assert s.iqr == 1.5
    assert summary([7.0]).var == 0.0
    with pytest.raises(InvalidInput):
        summary([])
    with pytest.raises(InvalidInput):
        summary([1.0, math.nan])


def test_wilson_by_hand() -> None:
    # 8 of 10 at z = 1.96: centre (0.8 + 0.19208) / 1.38416, half-width 1.96 * sqrt(0.016 + 0.0009604) / 1.38416
    low, high = wilson(8, 10)
    z = 1.959964
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    with pytest.raises(InvalidInput):
        wilson(3, 2)


def test_retrieval_prf_by_hand() -> None:
    # query 1: retrieved a, b, c; relevant a, d -> TP 1; query 2: retrieved x; relevant x -> TP 1
    prf = retrieval_prf([["a", "b", "c"], ["x"]], [{"a", "d"}, {"x"}])
    assert (prf.true_positives, prf.retrieved, prf.relevant) == (2, 4, 3)
    assert (prf.precision, prf.recall) == (0.5, 2 / 3)
    assert prf.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (prf.macro_precision, prf.macro_recall, prf.hit_rate) == ((1 / 3 + 1) / 2, (0.5 + 1) / 2, 1.0)
    empty = retrieval_prf([[]], [{"a"}])
    assert (empty.precision, empty.recall, empty.f1, empty.hit_rate) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(InvalidInput):
        retrieval_prf([["a"]], [])
    with pytest.raises(InvalidInput):
        retrieval_prf([["a", "a"]], [{"a"}])
