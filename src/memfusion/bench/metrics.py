"""The harness's metric definitions (Table 11): each figure with its spread and count.

- :func:`summary`: mean, variance, median, p95/p99, IQR, min/max and n of a sample;
- :func:`wilson`: the Wilson score interval of a rate (correct at 0 and n);
- :func:`retrieval_prf`: micro-averaged retrieval precision / recall / F1 (and per-query means).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from memfusion.errors import InvalidInput


@dataclass(frozen=True)
class Summary:
    """Location and spread of a sample; percentiles by linear interpolation (numpy's default)."""

    n: int
    mean: float
    var: float
    median: float
    p25: float
    p75: float
    p95: float
    p99: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.p75 - self.p25


def summary(values: Iterable[float]) -> Summary:
    """:class:`Summary` of ``values`` (at least one finite number; ``var`` is the sample variance)."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise InvalidInput("summary() needs at least one value")
    if not np.isfinite(x).all():
        raise InvalidInput("summary() got NaN or inf among its values")
    p25, p50, p75, p95, p99 = np.percentile(x, [25, 50, 75, 95, 99])
    return Summary(
        n=int(x.size),
        mean=float(x.mean()),
        var=float(x.var(ddof=1)) if x.size > 1 else 0.0,
        median=float(p50),
        p25=float(p25),
        p75=float(p75),
        p95=float(p95),
        p99=float(p99),
        min=float(x.min()),
        max=float(x.max()),
    )


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of the rate ``successes / n`` (95% by default)."""
    if n < 1 or not 0 <= successes <= n:
        raise InvalidInput(f"wilson() needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PRF:
    """Retrieval quality over ``queries`` queries.

    Micro averages pool every query's hits: ``precision = TP / retrieved``, ``recall = TP /
    relevant``, ``f1`` their harmonic mean; ``macro_*`` average the per-query values (a query
    with nothing retrieved has precision 0); ``hit_rate`` is the fraction of queries with at
    least one relevant item retrieved.
    """

    queries: int
    retrieved: int
    relevant: int
    true_positives: int
    precision: float
    recall: float
    f1: float
    macro_precision: float
    macro_recall: float
    hit_rate: float


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def retrieval_prf(retrieved: Sequence[Sequence[Hashable]], relevant: Sequence[Iterable[Hashable]]) -> PRF:
    """Precision / recall / F1 of ``retrieved[i]`` (ranked ids, no duplicates) against ``relevant[i]``."""
    if len(retrieved) != len(relevant) or not retrieved:
        raise InvalidInput(
            f"retrieval_prf needs one relevant set per query and at least one query, got "
            f"{len(retrieved)} retrieved lists and {len(relevant)} relevant sets"
        )
    tp = n_ret = n_rel = hits = 0
    precisions: list[float] = []
    recalls: list[float] = []
    for got, want in zip(retrieved, relevant, strict=True):
        want_set = set(want)
        if not want_set:
            raise InvalidInput("every query needs at least one relevant item")
        if len(set(got)) != len(got):
            raise InvalidInput("a retrieved list contains duplicates")
        found = len(want_set.intersection(got))
        tp, n_ret, n_rel, hits = tp + found, n_ret + len(got), n_rel + len(want_set), hits + (found > 0)
        precisions.append(found / len(got) if got else 0.0)
        recalls.append(found / len(want_set))
    p, r = (tp / n_ret if n_ret else 0.0), tp / n_rel
    return PRF(
        queries=len(retrieved),
        retrieved=n_ret,
        relevant=n_rel,
        true_positives=tp,
        precision=p,
        recall=r,
        f1=_f1(p, r),
        macro_precision=sum(precisions) / len(precisions),
        macro_recall=sum(recalls) / len(recalls),
        hit_rate=hits / len(retrieved),
    )
