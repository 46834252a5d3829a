"""Metric definitions against values computed by hand."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

from memfusion.bench.metrics import (
    cuda_peak_bytes,
    hit_rate,
    kv_memory,
    latency,
    page_recall,
    peak_rss_bytes,
    rate,
    retention,
    retrieval_prf,
    summary,
    throughput,
    wilson,
)
from memfusion.errors import InvalidInput
from memfusion.kv.stats import KVStats


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


def test_rate_of_binary_scores_is_wilson_and_partial_scores_use_the_mean() -> None:
    r = rate([1, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    assert (r.value, r.n) == (0.8, 10)
    assert (r.low, r.high) == pytest.approx(wilson(8, 10))
    # partial scores: the Wilson formula at p = mean = 0.375 with n = 4
    z, p, n = 1.959964, 0.375, 4
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    partial = rate([0.5, 0.25, 0.75, 0.0])
    assert partial.value == 0.375 and (partial.low, partial.high) == pytest.approx((centre - half, centre + half))
    for n in range(1, 30):  # the interval holds the rate, even at 0 and 1 where rounding could cut it
        for k in range(n + 1):
            r = rate([1.0] * k + [0.0] * (n - k))
            assert 0.0 <= r.low <= r.value <= r.high <= 1.0
    with pytest.raises(InvalidInput):
        rate([])
    with pytest.raises(InvalidInput):
        rate([1.5])


def test_hit_rate_by_hand() -> None:
    r = hit_rate(3, 4)
    assert r is not None and (r.value, r.n) == (0.75, 4)
    assert (r.low, r.high) == pytest.approx(wilson(3, 4))
    assert hit_rate(0, 0) is None
    with pytest.raises(InvalidInput):
        hit_rate(5, 4)


def test_latency_splits_prefill_and_per_token_decode() -> None:
    lat = latency([0.1, 0.3], [[0.01, 0.02], [0.03]])
    assert (lat.prefill.n, lat.prefill.mean) == (2, pytest.approx(200.0))
    assert lat.decode is not None and lat.decode.n == 3  # pooled per-token steps, in ms
    assert (lat.decode.mean, lat.decode.median, lat.decode.min, lat.decode.max) == pytest.approx(
        (20.0, 20.0, 10.0, 30.0)
    )
    assert lat.decode.var == pytest.approx(100.0)  # sample variance of 10, 20, 30
    # total per request: 100 + 10 + 20 and 300 + 30
    assert (lat.total.min, lat.total.max) == pytest.approx((130.0, 330.0))
    assert latency([0.1], [[]]).decode is None  # one generated token: no decode step
    with pytest.raises(InvalidInput):
        latency([0.1], [])


def test_throughput_pools_runs_and_keeps_their_spread() -> None:
    t = throughput([10, 30], [1.0, 2.0])
    assert t.tokens_per_s == pytest.approx(40 / 3) and (t.tokens, t.seconds) == (40, 3.0)
    assert (t.per_run.mean, t.per_run.min, t.per_run.max, t.per_run.n) == pytest.approx((12.5, 10.0, 15.0, 2))
    with pytest.raises(InvalidInput):
        throughput([1], [0.0])
    with pytest.raises(InvalidInput):
        throughput([1, 2], [1.0])


def test_kv_memory_from_kvstats() -> None:
    stats = [
        KVStats("dense", bytes_resident=1000, peak_bytes=1500),
        KVStats("dense", bytes_resident=3000, peak_bytes=3500),
    ]
    m = kv_memory(stats)
    assert (m.resident.mean, m.resident.min, m.resident.max) == (2000.0, 1000.0, 3000.0)
    assert (m.peak.mean, m.peak_max, m.resident.n) == (2500.0, 3500, 2)
    with pytest.raises(InvalidInput):
        kv_memory([])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_peak_rss_matches_the_kernels_high_water_mark() -> None:
    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM line")

    # Both read the same high-water mark; the kernel's per-CPU RSS counters make getrusage's copy
    # approximate (by up to a few pages per CPU), so allow a small slack. A unit slip (kB vs bytes) is 1000x.
    slack = 16 * 1024 * 1024
    before = hwm()
    peak = peak_rss_bytes()
    assert before - slack <= peak <= hwm() + slack
    assert cuda_peak_bytes("cpu") is None


def _oracle_recall_loop(selected: list[int], probs: list[float], page_size: int) -> float:
    """Reference: page masses by an explicit loop, ranked by (-mass, page id)."""
    pages = (len(probs) + page_size - 1) // page_size
    mass = [0.0] * pages
    for t, p in enumerate(probs):
        mass[t // page_size] += p
    ranked = sorted(range(pages), key=lambda j: (-mass[j], j))
    oracle = set(ranked[: len(selected)])
    return sum(1 for s in selected if s in oracle) / len(selected)


def test_page_recall_by_hand_and_against_a_loop() -> None:
    # masses of pages 0..3: 0.2, 0.5, 0.05, 0.25 -> the oracle's top 2 are pages 1 and 3
    probs = [0.1, 0.1, 0.4, 0.1, 0.0, 0.05, 0.2, 0.05]
    assert page_recall([3, 1], probs, 2) == 1.0
    assert page_recall([1, 0], probs, 2) == 0.5
    assert page_recall([2], probs, 2) == 0.0
    assert page_recall([1], probs[:7], 2) == 1.0  # a partial last page counts what it holds
    rng = random.Random(0)
    for _ in range(200):
        n, size = rng.randint(1, 40), rng.randint(1, 6)
        probs = [rng.random() for _ in range(n)]
        pages = (n + size - 1) // size
        selected = rng.sample(range(pages), rng.randint(1, pages))
        assert page_recall(selected, probs, size) == pytest.approx(_oracle_recall_loop(selected, probs, size))
    with pytest.raises(InvalidInput):
        page_recall([0, 0], probs, 2)
    with pytest.raises(InvalidInput):
        page_recall([99], [0.5, 0.5], 2)


def test_retention_bins_by_hand() -> None:
    bins = retention([1, 0, 1, 1, 0], [0.0, 0.1, 0.5, 1.0, 0.99], [0.0, 0.5, 1.0])
    assert [(b.low, b.high) for b in bins] == [(0.0, 0.5), (0.5, 1.0)]
    first, last = bins[0].accuracy, bins[1].accuracy
    assert first is not None and (first.value, first.n) == (0.5, 2)  # positions 0.0 and 0.1
    assert last is not None and (last.value, last.n) == (pytest.approx(2 / 3), 3)  # 0.5, 1.0 (last edge), 0.99
    assert (last.low, last.high) == pytest.approx(wilson(2, 3))
    by_distance = retention([1, 0], [10, 20], [0, 100, 200, 300])
    assert by_distance[0].accuracy is not None and by_distance[0].accuracy.n == 2
    assert by_distance[1].accuracy is None and by_distance[2].accuracy is None
    with pytest.raises(InvalidInput):
        retention([1], [1.5], [0.0, 1.0])
    with pytest.raises(InvalidInput):
        retention([1], [0.5], [1.0, 0.0])
