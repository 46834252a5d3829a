"""Analysis of the fusion suite's results (:mod:`memfusion.bench.fusion`): per route and length
summaries (:func:`summarize`, pooled over lengths too), the accuracy / KV-memory Pareto front
(:func:`pareto_front`, :func:`front_of`) and whether ``auto`` is on it (:func:`auto_on_front`)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memfusion.bench import metrics
from memfusion.bench.fusion import KINDS, MB
from memfusion.errors import InvalidInput


@dataclass(frozen=True)
class RouteSummary:
    """One route at one length (``length`` None: all lengths pooled). Figures cover the rows
    without error (``n``; ``errors`` counts the others): ``accuracy`` (exact match) with its
    Wilson 95% interval, ``by_kind`` per question kind; KV peak MB (measured, 2**20 bytes) median
    and p90; decode ms per decode step, median over samples; total ms (retrieval + prefill +
    decode + overhead), median; ``retrieval_rate``: the share of samples with facts put in
    context; ``within_budget``: the share whose measured KV peak fit the budget; ``budget_mb``:
    the budget the route ran under (None: none); ``strategies``: the strategies taken, counted."""

    length: int | None
    route: str
    n: int
    errors: int
    accuracy: metrics.Rate | None
    by_kind: dict[str, metrics.Rate]
    kv_peak_mb: float | None
    kv_peak_mb_p90: float | None
    decode_ms_per_token: float | None
    total_ms: float | None
    retrieval_rate: float | None
    within_budget: float | None
    budget_mb: float | None
    strategies: dict[str, int]


def _median(values: Sequence[float]) -> float | None:
    return metrics.summary(values).median if values else None


def summarize_group(rows: Sequence[dict[str, Any]], length: int | None, route: str) -> RouteSummary:
    """:class:`RouteSummary` of ``rows`` (one route; one length or all)."""
    ok = [r for r in rows if r.get("error") is None]
    kv = [r["kv_peak_bytes"] / MB for r in ok if r.get("kv_peak_bytes") is not None]
    decode = [1e3 * r["decode_s"] / r["decode_steps"] for r in ok if r.get("decode_steps")]
    budgets = {r.get("budget_mb") for r in rows}
    return RouteSummary(
        length=length,
        route=route,
        n=len(ok),
        errors=len(rows) - len(ok),
        accuracy=metrics.rate(float(r["correct"]) for r in ok) if ok else None,
        by_kind={
            kind: metrics.rate(float(r["correct"]) for r in ok if r["kind"] == kind)
            for kind in KINDS
            if any(r["kind"] == kind for r in ok)
        },
        kv_peak_mb=_median(kv),
        kv_peak_mb_p90=float(np.percentile(kv, 90)) if kv else None,
        decode_ms_per_token=_median(decode),
        total_ms=_median([1e3 * r["total_s"] for r in ok]),
        retrieval_rate=sum(bool(r["retrieved"]) for r in ok) / len(ok) if ok else None,
        within_budget=sum(bool(r["within_budget"]) for r in ok) / len(ok) if ok else None,
        budget_mb=budgets.pop() if len(budgets) == 1 else None,
        strategies=dict(Counter(str(r["strategy"]) for r in ok).most_common()),
    )


def summarize(rows: Iterable[dict[str, Any]]) -> list[RouteSummary]:
    """Per length (ascending) and route (first-seen order), then every route over all lengths
    (``length`` None)."""
    rows = list(rows)
    routes = list(dict.fromkeys(str(r["route"]) for r in rows))
    lengths = sorted({int(r["length"]) for r in rows})
    out = []
    for n in [*lengths, None]:
        for route in routes:
            group = [r for r in rows if r["route"] == route and (n is None or r["length"] == n)]
            if group:
                out.append(summarize_group(group, n, route))
    return out


def pareto_front(points: Sequence[tuple[str, float, float]]) -> set[str]:
    """The names of the non-dominated points ``(name, accuracy, kv_mb)``: higher accuracy and lower
    memory are better; a point is dominated when another has accuracy >= and memory <= with at
    least one strictly better (equal points do not dominate each other). Names must be distinct.

    Sweep in increasing memory: a point survives iff its accuracy is strictly above the best
    accuracy of every point with strictly less memory and it is the most accurate at its memory."""
    names = [p[0] for p in points]
    if len(set(names)) != len(names):
        raise InvalidInput(f"pareto_front needs distinct names, got {names}")
    for name, acc, mem in points:
        if not (math.isfinite(acc) and math.isfinite(mem)):
            raise InvalidInput(f"pareto_front needs finite accuracy and memory, got {name}: ({acc}, {mem})")
    front: set[str] = set()
    best_below = -math.inf  # best accuracy among points of strictly less memory
    ordered = sorted(points, key=lambda p: p[2])
    j = 0
    while j < len(ordered):
        mem = ordered[j][2]
        group = [p for p in ordered[j:] if p[2] == mem]  # same memory: only the most accurate can survive
        top = max(p[1] for p in group)
        if top > best_below:
            front.update(p[0] for p in group if p[1] == top)
        best_below = max(best_below, top)
        j += len(group)
    return front


def front_of(summaries: Iterable[RouteSummary], length: int | None) -> set[str]:
    """The Pareto front (accuracy vs median KV peak MB) of the routes at ``length``."""
    points = [
        (s.route, s.accuracy.value, s.kv_peak_mb)
        for s in summaries
        if s.length == length and s.accuracy is not None and s.kv_peak_mb is not None
    ]
    return pareto_front(points)


def auto_on_front(summaries: Sequence[RouteSummary]) -> dict[int, bool]:
    """Per length where ``auto`` ran: whether it is on the Pareto front (accuracy vs median KV MB)."""
    lengths = sorted({s.length for s in summaries if s.length is not None and s.route == "auto" and s.n})
    return {n: "auto" in front_of(summaries, n) for n in lengths}
