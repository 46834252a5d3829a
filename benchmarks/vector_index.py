"""Choose the ANN library of ``memfusion.store.index`` by measurement: usearch vs faiss vs hnswlib.

    .venv/bin/python benchmarks/vector_index.py              # N=100_000, d=384, 200 queries
    .venv/bin/python benchmarks/vector_index.py --n 20000    # a quick run

Data (seeded; cosine = inner product): ``--data clustered`` (default) draws N unit vectors around
N/100 random centers (noise of norm --spread, so a point has cosine ~0.7 with its center) and 200
queries from the same distribution (not copies of data points): like real sentence embeddings it
has structure. ``--data uniform`` draws i.i.d. uniform unit vectors: the worst case for any graph
index (no neighbourhood structure in 384-d; at N=100K, M=16, HNSW stays far below recall 0.95).

Every library builds an HNSW graph with the same M (connectivity) and ef_construction;
ef_search is the smallest value of a ladder that reaches recall@10 >= --target against exact
numpy brute force (tuned on the same queries it is judged on: say so when quoting the figures).

Measured per library: build time (default threads), QPS one query at a time on one thread (how
the store searches), QPS of the whole batch with the library's default threads, recall@10, and
the resident-memory growth of the build. Then filtered search: a random candidate set of 1%, 10%
and 50% of the ids, searched *inside* the index where the library can (faiss: an IDSelector in C++;
hnswlib: a Python filter callable; usearch's Python binding has no filtered search), against the
exact top-10 among the candidates; plus numpy exact search among the candidates as the baseline.

Figures are medians over --repeats passes with the spread (min-max); the header names the
machine and versions. Nothing here decides a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np

EF_LADDER = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
K = 10


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)  # (n, d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> np.ndarray:
    """Unit vectors around random centers: ``normalize(center + noise)``, ``|noise| ~ spread``: (n, d)."""
    d = centers.shape[1]
    x = centers[rng.integers(len(centers), size=n)] + rng.standard_normal((n, d), dtype=np.float32) * (
        spread / np.sqrt(d)
    )  # (n, d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k ids (row numbers of ``data``) per query, optionally among ``rows``: (q, k)."""
    sub = data if rows is None else data[rows]
    scores = queries @ sub.T  # (q, n_sub)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (q, k), unordered
    return top if rows is None else rows[top]


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def short_fraction(found: list[np.ndarray], k: int) -> float:
    return sum(int((f >= 0).sum() < k) for f in found) / len(found)


@dataclass
class Lib:
    """One library's HNSW behind four callables (built by the ``build_*`` functions below)."""

    name: str
    set_ef: Callable[[int], None]
    one: Callable[[np.ndarray], np.ndarray]  # (d,) -> (k,) ids; one query, one thread
    batch: Callable[[np.ndarray], np.ndarray]  # (q, d) -> (q, k) ids; default threads
    filtered: Callable[[np.ndarray, np.ndarray], np.ndarray] | None  # (query, candidate rows) -> ids
    filter_kind: str
    build_s: float = 0.0
    mem_mib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def build_faiss(data: np.ndarray, m: int, efc: int) -> Lib:
    """faiss IndexHNSWFlat, built through memfusion's HNSWIndex so both can be timed on one graph."""
    import faiss

    from memfusion.store.index import HNSWIndex

    ours = HNSWIndex(data.shape[1], m=m, ef_construction=efc, exact_threshold=0)
    ours.add(np.arange(len(data), dtype=np.int64), data)  # ids = rows
    index = ours.raw
    default_threads = faiss.omp_get_max_threads()
    state = {"ef": 64}

    def set_ef(ef: int) -> None:
        state["ef"] = ef
        index.hnsw.efSearch = ef
        ours.ef_search = ef

    def one(q: np.ndarray) -> np.ndarray:
        return index.search(q[None], K)[1][0]

    def batch(qs: np.ndarray) -> np.ndarray:
        faiss.omp_set_num_threads(default_threads)
        try:
            return index.search(qs, K)[1]
        finally:
            faiss.omp_set_num_threads(1)

    def filtered(q: np.ndarray, rows: np.ndarray, ef: int | None = None) -> np.ndarray:
        mask = np.zeros(index.ntotal, dtype=bool)
        mask[rows] = True
        bits = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3 = row i is eligible
        params = faiss.SearchParametersHNSW(efSearch=ef or state["ef"], sel=faiss.IDSelectorBitmap(bits))
        return index.search(q[None], K, params=params)[1][0]

    def boosted(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return filtered(q, rows, min(1024, int(np.ceil(state["ef"] * index.ntotal / len(rows)))))

    faiss.omp_set_num_threads(1)
    lib = Lib("faiss", set_ef, one, batch, filtered, "IDSelectorBitmap (C++, in the graph walk)")
    lib.extra.update(ours=ours, boosted=boosted)
    return lib


def build_hnswlib(data: np.ndarray, m: int, efc: int) -> Lib:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=data.shape[1])
    index.init_index(max_elements=len(data), M=m, ef_construction=efc, random_seed=0)
    index.add_items(data, np.arange(len(data)))

    def one(q: np.ndarray) -> np.ndarray:
        return index.knn_query(q, k=K, num_threads=1)[0][0].astype(np.int64)

    def batch(qs: np.ndarray) -> np.ndarray:
        return index.knn_query(qs, k=K)[0].astype(np.int64)

    def filtered(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        allowed = set(rows.tolist())
        try:
            labels = index.knn_query(q, k=K, num_threads=1, filter=allowed.__contains__)[0][0]
        except RuntimeError:  # fewer than k eligible results found: hnswlib raises
            return np.full(K, -1, dtype=np.int64)
        return labels.astype(np.int64)

    return Lib("hnswlib", index.set_ef, one, batch, filtered, "Python callable per visited node (needs the GIL)")


def build_usearch(data: np.ndarray, m: int, efc: int) -> Lib:
    from usearch.index import Index

    index = Index(ndim=data.shape[1], metric="ip", dtype="f32", connectivity=m, expansion_add=efc)
    index.add(np.arange(len(data), dtype=np.uint64), data)
    state = {"ef": 64}

    def set_ef(ef: int) -> None:
        state["ef"] = ef
        index.expansion_search = ef

    def one(q: np.ndarray) -> np.ndarray:
        return np.asarray(index.search(q, K, threads=1).keys, dtype=np.int64)

    def batch(qs: np.ndarray) -> np.ndarray:
        return np.asarray(index.search(qs, K).keys, dtype=np.int64)

    return Lib("usearch", set_ef, one, batch, None, "none in the Python binding (only post-filtering)")


BUILDERS = {"faiss": build_faiss, "hnswlib": build_hnswlib, "usearch": build_usearch}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    out: Any = None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def fmt(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=128)
    p.add_argument("--target", type=float, default=0.95, help="recall@10 that ef_search is tuned to reach")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--libs", default="faiss,hnswlib,usearch")
    p.add_argument("--fractions", default="0.01,0.1,0.5", help="candidate-set sizes for filtered search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--efs",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[16, 32, 64, 128],
        help="ef_search values of the same-ef comparison",
    )
    p.add_argument("--exact-threshold", type=int, default=20_000, help="memfusion's exact-search threshold")
    p.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around a center (clustered data)")
    a = p.parse_args()

    rng = np.random.default_rng(a.seed)
    if a.data == "uniform":
        data, queries = unit(rng, a.n, a.dim), unit(rng, a.queries, a.dim)
    else:
        centers = unit(rng, max(1, a.n // 100), a.dim)  # (n / 100, d)
        data, queries = clustered(rng, centers, a.n, a.spread), clustered(rng, centers, a.queries, a.spread)
    truth = exact_topk(data, queries, K)  # (q, k)
    libs = [s.strip() for s in a.libs.split(",") if s.strip()]
    print(
        f"# vector index benchmark: data={a.data} N={a.n:,} d={a.dim} queries={a.queries} k={K} M={a.m} "
        f"ef_construction={a.ef_construction} target recall@10>={a.target} repeats={a.repeats} seed={a.seed}"
    )
    print(
        f"# {platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; python "
        f"{platform.python_version()}, numpy {np.__version__}, "
        + ", ".join(f"{lib} {version({'faiss': 'faiss-cpu'}.get(lib, lib))}" for lib in libs)
    )

    ex_times, _ = timed(lambda: [exact_topk(data, q[None], K) for q in queries], a.repeats)
    exact_qps = [a.queries / t for t in ex_times]
    print(f"\nnumpy exact (one query at a time): QPS {fmt(exact_qps)}\n")

    rows: list[str] = []
    built: list[Lib] = []
    for name in libs:
        gc.collect()
        before = rss_mib()
        t0 = time.perf_counter()
        lib = BUILDERS[name](data, a.m, a.ef_construction)
        lib.build_s = time.perf_counter() - t0
        lib.mem_mib = rss_mib() - before
        ef_used, rec = EF_LADDER[-1], 0.0
        for ef in EF_LADDER:
            lib.set_ef(ef)
            rec = recall([lib.one(q) for q in queries], truth)
            if rec >= a.target:
                ef_used = ef
                break
        curve = []
        for ef in a.efs:
            lib.set_ef(ef)
            t, found = timed(lambda lib=lib: [lib.one(q) for q in queries], a.repeats)
            curve.append((ef, recall(found, truth), [a.queries / x for x in t]))
        lib.extra["curve"] = curve
        lib.set_ef(ef_used)
        one_t, _ = timed(lambda lib=lib: [lib.one(q) for q in queries], a.repeats)
        batch_t, found = timed(lambda lib=lib: lib.batch(queries), a.repeats)
        lib.extra.update(
            ef=ef_used,
            recall=rec,
            one_qps=[a.queries / t for t in one_t],
            batch_qps=[a.queries / t for t in batch_t],
            batch_recall=recall(list(found), truth),
        )
        rows.append(
            f"| {name} | {lib.build_s:.1f} | {lib.mem_mib:.0f} | {ef_used} | {rec:.3f} | {fmt(lib.extra['one_qps'])} "
            f"| {fmt(lib.extra['batch_qps'])} | {lib.extra['batch_recall']:.3f} "
            f"| {statistics.median(lib.extra['one_qps']) / statistics.median(exact_qps):.1f}x |"
        )
        built.append(lib)
        print(f"  built {name} in {lib.build_s:.1f}s (ef_search={ef_used}, recall@10={rec:.3f})", flush=True)

    print("\n## Unfiltered search (QPS: median (min-max) over repeats)\n")
    print(
        "| library | build s | RSS +MiB | ef_search | recall@10 | QPS 1 thread, 1 query/call "
        "| QPS batch, default threads | batch recall@10 | 1-thread QPS vs numpy exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))

    print("\n## Recall / QPS at the same ef_search (1 thread, 1 query per call)\n")
    print("| library | " + " | ".join(f"ef={ef}: recall, QPS" for ef in a.efs) + " |")
    print("|---|" + "---|" * len(a.efs))
    for lib in built:
        print(
            f"| {lib.name} | "
            + " | ".join(f"{r:.3f}, {statistics.median(q):,.0f}" for _, r, q in lib.extra["curve"])
            + " |"
        )

    fa = next((lib for lib in built if lib.name == "faiss"), None)
    if fa is not None:  # memfusion's adapter on the very same faiss graph: our overhead as a ratio
        ours = fa.extra["ours"]
        fa.set_ef(fa.extra["ef"])
        raw_t, _ = timed(lambda: [fa.one(q) for q in queries], a.repeats)
        our_t, found = timed(lambda: [ours.search(q, K)[0] for q in queries], a.repeats)
        raw_qps, our_qps = [a.queries / x for x in raw_t], [a.queries / x for x in our_t]
        print(f"\n## memfusion HNSWIndex vs raw faiss on the same graph (ef_search={fa.extra['ef']}, 1 thread)\n")
        print("| | recall@10 | QPS | ratio |\n|---|---|---|---|")
        print(f"| raw faiss IndexHNSWFlat.search | {fa.extra['recall']:.3f} | {fmt(raw_qps)} | 1.00 |")
        print(
            f"| memfusion HNSWIndex.search | {recall(found, truth):.3f} | {fmt(our_qps)} "
            f"| {statistics.median(our_qps) / statistics.median(raw_qps):.2f} |"
        )

    print("\n## Filtered search inside the index (one query per call, one thread, same ef_search)\n")
    print("| library | how | candidates | recall@10 among candidates | queries with < 10 results | QPS |")
    print("|---|---|---|---|---|---|")
    for frac in (float(f) for f in a.fractions.split(",")):
        rows_ok = np.sort(rng.choice(a.n, size=max(K, int(a.n * frac)), replace=False))
        ftruth = exact_topk(data, queries, K, rows_ok)
        t, _ = timed(lambda rows_ok=rows_ok: [exact_topk(data, q[None], K, rows_ok) for q in queries], a.repeats)
        label = f"{frac:.0%} ({len(rows_ok):,})"
        qps = fmt([a.queries / x for x in t])
        print(f"| numpy exact | gather candidates + matmul | {label} | 1.000 | 0% | {qps} |")
        for lib in built:
            if lib.filtered is None:
                print(f"| {lib.name} | {lib.filter_kind} | {label} | n/a | n/a | n/a |")
                continue
            t, found = timed(lambda lib=lib, r=rows_ok: [lib.filtered(q, r) for q in queries], a.repeats)
            print(
                f"| {lib.name} | {lib.filter_kind} | {label} | {recall(found, ftruth):.3f} "
                f"| {short_fraction(found, K):.0%} | {fmt([a.queries / x for x in t])} |",
                flush=True,
            )
            if "boosted" in lib.extra:
                t, found = timed(lambda lib=lib, r=rows_ok: [lib.extra["boosted"](q, r) for q in queries], a.repeats)
                print(
                    f"| {lib.name} | same, ef_search / fraction (at most 1024) | {label} "
                    f"| {recall(found, ftruth):.3f} | {short_fraction(found, K):.0%} "
                    f"| {fmt([a.queries / x for x in t])} |",
                    flush=True,
                )
            if "ours" in lib.extra:  # memfusion's adapter: exact among <= threshold candidates, else as above
                ours = lib.extra["ours"]
                ours.exact_threshold = a.exact_threshold
                t, found = timed(lambda ours=ours, r=rows_ok: [ours.search(q, K, r)[0] for q in queries], a.repeats)
                ours.exact_threshold = 0
                how = "exact" if len(rows_ok) <= a.exact_threshold else "filtered HNSW, ef / fraction, exact if short"
                print(
                    f"| memfusion HNSWIndex | {how} (exact_threshold={a.exact_threshold:,}) | {label} "
                    f"| {recall(found, ftruth):.3f} | {short_fraction(found, K):.0%} "
                    f"| {fmt([a.queries / x for x in t])} |",
                    flush=True,
                )

    best = max(built, key=lambda lib: statistics.median(lib.extra["one_qps"]))
    print(
        f"\nFastest single-thread unfiltered search at recall@10>={a.target}: {best.name}. "
        "The choice also weighs filtered search inside the index (see the second table)."
    )


if __name__ == "__main__":
    main()
