"""Vector indexes: exactness of ExactIndex, HNSW recall, candidates inside the search, replace/remove."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from memfusion.errors import InvalidInput, NotFound
from memfusion.store.index import AdaptiveIndex, ExactIndex, HNSWIndex, VectorIndex, make_index

DIM = 32


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(ids: np.ndarray, vecs: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = vecs @ q  # (n,)
    return ids[np.argsort(-scores, kind="stable")[:k]]


# every index, small enough that even HNSW searches through the graph (exact_threshold=0)
FACTORIES: dict[str, Callable[[], VectorIndex]] = {
    "exact": lambda: ExactIndex(DIM),
    "hnsw": lambda: HNSWIndex(DIM, exact_threshold=0, compact_min=0),
    "adaptive": lambda: make_index(DIM, exact_threshold=50),
}


@pytest.fixture(params=sorted(FACTORIES))
def index(request: pytest.FixtureRequest) -> VectorIndex:
    return FACTORIES[request.param]()


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.permutation(10_000)[:3000].astype(np.int64) * 7 + 3  # sparse, unordered ids
    return ids, unit(rng, len(ids)), unit(rng, 50)


def test_protocol_and_empty(index: VectorIndex) -> None:
    assert isinstance(index, VectorIndex)
    assert len(index) == 0 and index.ids().shape == (0,)
    ids, scores = index.search(np.ones(DIM, dtype=np.float32), 5)
    assert ids.shape == (0,) and scores.shape == (0,)


def test_exact_index_matches_brute_force(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, vecs, queries = data
    index = ExactIndex(DIM)
    index.add(ids[:1000], vecs[:1000])
    index.add(ids[1000:], vecs[1000:])
    for q in queries[:10]:
        found, scores = index.search(q, 10)
        np.testing.assert_array_equal(found, brute(ids, vecs, q, 10))
        assert np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, index.vectors(found) @ q, rtol=1e-5, atol=1e-6)


def test_hnsw_recall_at_10(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, vecs, queries = data
    exact, hnsw = ExactIndex(DIM), HNSWIndex(DIM, exact_threshold=0)
    exact.add(ids, vecs)
    hnsw.add(ids, vecs)
    hits = sum(len(np.intersect1d(hnsw.search(q, 10)[0], exact.search(q, 10)[0])) for q in queries)
    assert hits / (10 * len(queries)) >= 0.95


def test_candidates_are_respected(index: VectorIndex, data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, vecs, queries = data
    n = 400
    index.add(ids[:n], vecs[:n])
    rng = np.random.default_rng(1)
    for size in (1, 5, 30, 200):
        cand = rng.choice(ids[:n], size=size, replace=False)
        cand_with_absent = np.concatenate([cand, [-1, 10**12]])  # absent ids are ignored
        for q in queries[:5]:
            found, _ = index.search(q, 10, cand_with_absent)
            assert set(found.tolist()) <= set(cand.tolist())
            assert len(found) == min(10, size)
            if size <= 30:  # few candidates: the top-k among them is exact
                mask = np.isin(ids[:n], cand)
                np.testing.assert_array_equal(found, brute(ids[:n][mask], vecs[:n][mask], q, 10))


def test_filtered_walk_that_comes_back_short_falls_back_to_exact(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    ids, vecs, queries = data
    # ef 1 over 3000 rows with 3 eligible ids: the graph walk cannot find them all
    index = HNSWIndex(DIM, ef_search=1, max_ef=1, exact_threshold=0)
    index.add(ids, vecs)
    cand = ids[[10, 500, 2500]]
    for q in queries[:5]:
        found, _ = index.search(q, 10, cand)
        np.testing.assert_array_equal(found, brute(cand, vecs[[10, 500, 2500]], q, 10))


def test_hnsw_exact_path_over_many_rows(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Above the gather size the exact path is faiss's flat scan with a bitmap: still exact."""
    ids, vecs, queries = data
    index = HNSWIndex(DIM, exact_threshold=10**6, compact_min=10**6)
    index.add(ids, vecs)
    index.remove(ids[:100])  # dead rows must stay invisible to the exact scan too
    live_ids, live_vecs = ids[100:], vecs[100:]
    cand = np.concatenate([ids[:2600], ids[:50]])  # duplicates and removed ids
    mask = np.isin(live_ids, cand)
    for q in queries[:5]:
        np.testing.assert_array_equal(index.search(q, 10)[0], brute(live_ids, live_vecs, q, 10))
        found, scores = index.search(q, 10, cand)
        np.testing.assert_array_equal(found, brute(live_ids[mask], live_vecs[mask], q, 10))
        np.testing.assert_allclose(scores, index.vectors(found) @ q, rtol=1e-5, atol=1e-6)


def test_replace_and_remove(index: VectorIndex) -> None:
    rng = np.random.default_rng(2)
    v = unit(rng, 4)
    index.add(np.array([1, 2, 3]), v[:3])
    index.add(np.array([2]), v[3:4])  # replace: id 2 now maps to v[3] only
    assert len(index) == 3
    np.testing.assert_allclose(index.vectors(np.array([2])), v[3:4], atol=1e-6)
    found, scores = index.search(v[3], 3)
    assert sorted(found.tolist()) == [1, 2, 3]
    assert found[0] == 2 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert index.search(v[1], 1)[1][0] < 0.99  # the old vector of 2 is gone
    index.remove(np.array([2, 99]))  # absent ids are ignored
    assert sorted(index.ids().tolist()) == [1, 3] and len(index) == 2
    assert 2 not in index.search(v[3], 3)[0].tolist()
    with pytest.raises(NotFound):
        index.vectors(np.array([2]))
    index.remove(index.ids())
    assert len(index) == 0 and index.search(v[0], 3)[0].size == 0


def test_hnsw_compacts_dead_rows(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, vecs, queries = data
    index = HNSWIndex(DIM, exact_threshold=0, compact_min=100)
    index.add(ids[:1000], vecs[:1000])
    index.remove(ids[:700])
    assert index._ntotal == 300 and len(index) == 300  # rebuilt from the live rows
    np.testing.assert_allclose(index.vectors(ids[700:1000]), vecs[700:1000], atol=1e-6)
    for _ in range(3):  # replacements append rows until a compaction
        index.add(ids[700:1000], vecs[700:1000])
    assert len(index) == 300 and sorted(index.ids().tolist()) == sorted(ids[700:1000].tolist())
    found, _ = index.search(queries[0], 10)
    assert len(found) == 10 and set(found.tolist()) <= set(ids[700:1000].tolist())


def test_adaptive_switches_with_hysteresis(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, vecs, queries = data
    index = make_index(DIM, exact_threshold=100)
    assert isinstance(index, AdaptiveIndex)
    index.add(ids[:100], vecs[:100])
    assert not index.approximate
    index.add(ids[100:300], vecs[100:300])
    assert index.approximate and len(index) == 300
    np.testing.assert_allclose(index.vectors(ids[:300]), vecs[:300], atol=1e-6)
    index.remove(ids[:220])  # 80 left: still above 100 // 2
    assert index.approximate
    index.remove(ids[220:260])  # 40 left: back to exact
    assert not index.approximate and sorted(index.ids().tolist()) == sorted(ids[260:300].tolist())
    found, _ = index.search(queries[0], 5)
    np.testing.assert_array_equal(found, brute(ids[260:300], vecs[260:300], queries[0], 5))


def test_vectors_are_normalised(index: VectorIndex) -> None:
    index.add(np.array([7]), np.full((1, DIM), 3.0))
    np.testing.assert_allclose(np.linalg.norm(index.vectors(np.array([7]))), 1.0, rtol=1e-5)
    _, scores = index.search(np.full(DIM, 5.0), 1)
    np.testing.assert_allclose(scores, [1.0], rtol=1e-5)


@pytest.mark.parametrize(
    ("ids", "vectors"),
    [
        (np.array([1, 2]), np.ones((2, DIM + 1))),  # wrong dim
        (np.array([1, 2]), np.ones((3, DIM))),  # count mismatch
        (np.array([1]), np.full((1, DIM), np.nan)),  # NaN
        (np.array([1]), np.full((1, DIM), np.inf)),  # Inf
        (np.array([1]), np.zeros((1, DIM))),  # zero vector
        (np.array([1, 1]), np.ones((2, DIM))),  # duplicate ids in one add
        (np.array([1.5]), np.ones((1, DIM))),  # non-integer ids
    ],
)
def test_bad_add_is_refused_and_changes_nothing(index: VectorIndex, ids: np.ndarray, vectors: np.ndarray) -> None:
    index.add(np.array([100]), np.ones((1, DIM)))
    with pytest.raises(InvalidInput):
        index.add(ids, vectors)
    assert index.ids().tolist() == [100]


def test_bad_search_is_refused(index: VectorIndex) -> None:
    index.add(np.array([1]), np.ones((1, DIM)))
    for query in (np.ones(DIM + 1), np.full(DIM, np.nan), np.zeros(DIM)):
        with pytest.raises(InvalidInput):
            index.search(query, 1)
    for k in (0, -1, 1.5, True):
        with pytest.raises(InvalidInput):
            index.search(np.ones(DIM), k)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        index.search(np.ones(DIM), 1, np.array([0.5]))
    with pytest.raises(InvalidInput):
        ExactIndex(0)
    with pytest.raises(InvalidInput):
        HNSWIndex(DIM, m=1)


def test_ids_far_apart_use_the_sorted_lookup(index: VectorIndex) -> None:
    rng = np.random.default_rng(3)
    ids = np.array([2**40, -5, 3, 2**62], dtype=np.int64)
    vecs = unit(rng, 4)
    index.add(ids, vecs)
    found, _ = index.search(vecs[0], 4, np.array([2**62, 2**40, 2**40, 17]))  # duplicates, absent ids
    assert sorted(found.tolist()) == [2**40, 2**62] and found[0] == 2**40
    index.remove(np.array([2**40]))
    assert sorted(index.ids().tolist()) == [-5, 3, 2**62]
    assert index.search(vecs[0], 4, np.array([2**40]))[0].size == 0
