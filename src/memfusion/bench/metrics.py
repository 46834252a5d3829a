"""The harness's metric definitions (Table 11): each figure with its spread and count.

- :func:`summary`: mean, variance, median, p95/p99, IQR, min/max and n of a sample;
- :func:`wilson`: the Wilson score interval of a rate (correct at 0 and n); :func:`rate` the
  same for a list of scores (accuracy), :func:`hit_rate` for the prefix cache;
- :func:`retrieval_prf`: micro-averaged retrieval precision / recall / F1 (and per-query means);
- :func:`latency`: per-request prefill and per-token decode times (ms); :func:`throughput`:
  generated tokens per second;
- :func:`kv_memory`: exact KV bytes resident / peak from ``KVStats``; ``peak_rss_bytes``,
  ``cuda_peak_bytes``: process peaks (:mod:`memfusion.monitor.probes`, re-exported here);
- :func:`page_recall`: a sparse policy's selected pages against the oracle top-k pages by true
  attention mass;
- :func:`retention`: accuracy by bins of needle depth or of distance to the question.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from memfusion.errors import InvalidInput
from memfusion.monitor.probes import cuda_peak_bytes as cuda_peak_bytes
from memfusion.monitor.probes import peak_rss_bytes as peak_rss_bytes


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
    return _wilson_p(successes / n, n, z)


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


# --- rates ----------------------------------------------------------------------------------


def _wilson_p(p: float, n: int, z: float) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval always holds p; the clamps only absorb rounding (e.g. p = 1 giving high = 1 - 1e-16)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class Rate:
    """A rate ``value`` over ``n`` trials with its Wilson interval ``[low, high]`` (95%).

    For 0/1 outcomes ``value = successes / n`` and the interval is :func:`wilson`'s. Partial
    scores in [0, 1] (e.g. the recall of a multi-answer task) enter through their mean, the
    Wilson formula evaluated at ``p = mean`` (the interval of the same number of trials).
    """

    value: float
    n: int
    low: float
    high: float


def rate(scores: Iterable[float], z: float = 1.959964) -> Rate:
    """:class:`Rate` of per-trial scores in [0, 1] (at least one)."""
    x = [float(s) for s in scores]
    if not x:
        raise InvalidInput("rate() needs at least one score")
    if not all(0.0 <= s <= 1.0 for s in x):
        raise InvalidInput("rate() takes scores in [0, 1] (1 = correct); got a value outside")
    p = sum(x) / len(x)
    low, high = _wilson_p(p, len(x), z)
    return Rate(p, len(x), low, high)


def hit_rate(hits: int, lookups: int) -> Rate | None:
    """The prefix-cache hit rate ``hits / lookups`` with its Wilson interval; None without lookups."""
    if lookups < 0 or not 0 <= hits <= max(lookups, 0):
        raise InvalidInput(f"hit_rate needs 0 <= hits <= lookups, got {hits}/{lookups}")
    if lookups == 0:
        return None
    low, high = wilson(hits, lookups)
    return Rate(hits / lookups, lookups, low, high)


# --- latency and throughput -----------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Per-request latency in milliseconds, split as the issue asks.

    - ``prefill``: one value per request (the whole prompt's forward passes);
    - ``decode``: one value per decoded token, pooled over requests (the per-token decode time);
    - ``total``: one value per request, prefill plus the sum of its decode steps.
    """

    prefill: Summary
    decode: Summary | None
    total: Summary


def latency(prefill_seconds: Sequence[float], decode_seconds: Sequence[Sequence[float]]) -> Latency:
    """:class:`Latency` (ms) of requests: ``prefill_seconds[i]`` and the per-token ``decode_seconds[i]``."""
    if len(prefill_seconds) != len(decode_seconds) or not prefill_seconds:
        raise InvalidInput(
            f"latency() needs one decode list per request and at least one request, got "
            f"{len(prefill_seconds)} prefill times and {len(decode_seconds)} decode lists"
        )
    steps = [1e3 * s for row in decode_seconds for s in row]
    return Latency(
        prefill=summary(1e3 * s for s in prefill_seconds),
        decode=summary(steps) if steps else None,
        total=summary(1e3 * (p + sum(d)) for p, d in zip(prefill_seconds, decode_seconds, strict=True)),
    )


@dataclass(frozen=True)
class Throughput:
    """Generated tokens per second: ``tokens_per_s`` pools every run (``sum tokens / sum seconds``);
    ``per_run`` is the spread of the runs' own rates (``tokens[i] / seconds[i]``)."""

    tokens_per_s: float
    per_run: Summary
    tokens: int
    seconds: float


def throughput(tokens: Sequence[int], seconds: Sequence[float]) -> Throughput:
    """:class:`Throughput` of runs that generated ``tokens[i]`` tokens in ``seconds[i]`` (all rows of a batch)."""
    if len(tokens) != len(seconds) or not tokens:
        raise InvalidInput(f"throughput() needs as many token counts as times, got {len(tokens)} and {len(seconds)}")
    if any(t < 0 for t in tokens) or any(not s > 0 for s in seconds):
        raise InvalidInput("throughput() needs token counts >= 0 and times > 0")
    return Throughput(
        tokens_per_s=sum(tokens) / sum(seconds),
        per_run=summary(t / s for t, s in zip(tokens, seconds, strict=True)),
        tokens=int(sum(tokens)),
        seconds=float(sum(seconds)),
    )


# --- memory ---------------------------------------------------------------------------------


class _HasKVBytes(Protocol):
    bytes_resident: int
    peak_bytes: int


@dataclass(frozen=True)
class KVMemory:
    """Exact KV bytes of a set of requests (from :class:`memfusion.kv.KVStats`): ``resident`` after
    each request, ``peak`` during it (the in-flight chunk included), ``peak_max`` the largest peak."""

    resident: Summary
    peak: Summary
    peak_max: int


def kv_memory(stats: Sequence[_HasKVBytes]) -> KVMemory:
    """:class:`KVMemory` of the ``KVStats`` of requests (at least one)."""
    if not stats:
        raise InvalidInput("kv_memory() needs the KVStats of at least one request")
    return KVMemory(
        resident=summary(s.bytes_resident for s in stats),
        peak=summary(s.peak_bytes for s in stats),
        peak_max=max(int(s.peak_bytes) for s in stats),
    )


def reset_cuda_peak(device: str) -> None:
    """Start a new CUDA peak window on ``device`` (no-op off CUDA)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(device)


# --- sparse attention: page selection against the oracle ---------------------------------------


def page_recall(selected: Sequence[int], probs: Sequence[float], page_size: int) -> float:
    """Recall of the selected pages against the oracle's top-k pages by true attention mass.

    ``probs[t]`` is the attention probability of token ``t`` (one query, one head); page ``j``
    holds tokens ``[j * page_size, (j + 1) * page_size)`` and its mass is their sum. With
    ``k = len(selected)`` (distinct page ids), the oracle is the ``k`` pages of largest mass (ties
    go to the lower page id) and the result is ``|selected & oracle| / k``: 1 when the selection
    holds exactly the pages that carry the most attention.
    """
    if page_size < 1:
        raise InvalidInput(f"page_size must be >= 1, got {page_size}")
    p = np.asarray(list(probs), dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.isfinite(p).all() or (p < 0).any():
        raise InvalidInput("probs must be a non-empty 1-D sequence of finite, non-negative attention weights")
    pages = -(-p.size // page_size)
    sel = [int(s) for s in selected]
    if not sel or len(set(sel)) != len(sel) or not all(0 <= s < pages for s in sel):
        raise InvalidInput(f"selected must hold distinct page ids in [0, {pages}), at least one; got {sel}")
    padded = np.zeros(pages * page_size)
    padded[: p.size] = p
    mass = padded.reshape(pages, page_size).sum(axis=1)  # (pages,)
    oracle = np.argsort(-mass, kind="stable")[: len(sel)]  # stable: ties go to the lower id
    return len(set(sel).intersection(int(o) for o in oracle)) / len(sel)


# --- long-range retention ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bin:
    """Scores whose position lies in ``[low, high)`` (the last bin also holds ``high``)."""

    low: float
    high: float
    accuracy: Rate | None  # None for an empty bin


def retention(scores: Sequence[float], positions: Sequence[float], edges: Sequence[float]) -> list[Bin]:
    """Accuracy as a function of position (needle depth, or distance to the question, in tokens).

    ``edges`` are increasing bin edges ``e_0 < e_1 < ... < e_m``; bin ``i`` takes the positions in
    ``[e_i, e_{i+1})``, the last bin ``[e_{m-1}, e_m]``. Positions outside ``[e_0, e_m]`` are refused.
    """
    if len(scores) != len(positions):
        raise InvalidInput(f"retention() needs one position per score, got {len(positions)} for {len(scores)}")
    e = [float(x) for x in edges]
    if len(e) < 2 or any(b <= a for a, b in itertools.pairwise(e)):
        raise InvalidInput(f"edges must be at least two strictly increasing numbers, got {list(edges)}")
    groups: list[list[float]] = [[] for _ in range(len(e) - 1)]
    for s, x in zip(scores, positions, strict=True):
        if not e[0] <= x <= e[-1]:
            raise InvalidInput(f"position {x} lies outside the bins [{e[0]}, {e[-1]}]")
        i = min(bisect.bisect_right(e, x) - 1, len(groups) - 1)
        groups[i].append(float(s))
    return [Bin(e[i], e[i + 1], rate(g) if g else None) for i, g in enumerate(groups)]
