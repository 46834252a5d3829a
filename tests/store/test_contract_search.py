"""The Store contract, part 2: vector search with filters inside the search, versioned graph
edges, and check / repair of the derived index. Runs on every backend in ``conftest.BACKENDS``.

Search expectations come from an independent numpy computation of cosine similarity over
the vectors the test itself supplies (``vector=``), not from the store's index.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from memfusion.errors import NotFound
from memfusion.store import Op, Store
from tests.store.conftest import DIM, T0, FakeClock

S = timedelta(seconds=1)


def basis(*weights: tuple[int, float]) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    for axis, w in weights:
        v[axis] = w
    return v


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_filter_is_applied_inside_the_search(store: Store) -> None:
    query = basis((0, 1.0))
    vectors: dict[str, np.ndarray] = {}
    for i in range(20):  # very close to the query, tag "a"
        vectors[f"a{i}"] = basis((0, 1.0), (1, 0.01 * (i + 1)))
        store.put("ns", f"a{i}", f"near {i}", metadata={"tag": "a"}, vector=vectors[f"a{i}"])
    for i in range(3):  # far from the query, tag "b"
        vectors[f"b{i}"] = basis((0, 0.1 * (i + 1)), (2, 1.0))
        store.put("ns", f"b{i}", f"far {i}", metadata={"tag": "b"}, vector=vectors[f"b{i}"])
    unfiltered = store.search("ns", None, k=3, vector=query)
    assert [h.record.metadata["tag"] for h in unfiltered] == ["a", "a", "a"]  # post-filtering this gives 0
    hits = store.search("ns", None, k=3, vector=query, filter={"tag": "b"})
    expected = sorted(("b0", "b1", "b2"), key=lambda key: -cosine(vectors[key], query))
    assert [h.record.key for h in hits] == expected == ["b2", "b1", "b0"]
    assert [h.score for h in hits] == pytest.approx([cosine(vectors[k], query) for k in expected], abs=1e-6)
    all_a = store.search("ns", None, k=25, vector=query, filter={"tag": {"$in": ["a"]}})
    ranked = sorted((k for k in vectors if k.startswith("a")), key=lambda key: -cosine(vectors[key], query))
    assert [h.record.key for h in all_a] == ranked  # k > matches: every match, best first


def test_filter_values_match_by_json_equality(store: Store) -> None:
    values = {"int": 1, "float": 1.0, "true": True, "null": None, "str": "1", "list": [1, 2], "obj": {"b": 1}}
    for name, value in values.items():
        store.put("ns", name, f"value {name}", metadata={"n": value}, vector=basis((0, 1.0)))
    store.put("ns", "missing", "no n", metadata={}, vector=basis((0, 1.0)))
    store.put("ns", "dotted", "dotted key", metadata={"a.b": 1, "n": "x"}, vector=basis((0, 1.0)))
    store.put("ns", "nested", "nested key", metadata={"a": {"b": 1}}, vector=basis((0, 1.0)))

    def keys(flt: dict) -> set[str]:
        return {h.record.key for h in store.search("ns", None, k=50, vector=basis((0, 1.0)), filter=flt)}

    assert keys({"n": 1}) == {"int", "float"}  # 1 == 1.0, but True is not 1
    assert keys({"n": True}) == {"true"}
    assert keys({"n": None}) == {"null"}  # an explicit null, not a missing key
    assert keys({"n": "1"}) == {"str"}
    assert keys({"n": [1, 2]}) == {"list"}
    assert keys({"n": {"$in": [True, "1", {"b": 1}]}}) == {"true", "str", "obj"}
    assert keys({"n": {"$in": []}}) == set()
    assert keys({"a.b": 1}) == {"dotted"}  # a dotted key is one literal key, not a path
    assert keys({"a.b": 1, "n": "x"}) == {"dotted"}
    assert keys({"a.b": 1, "n": 1}) == set()  # conditions are ANDed


def test_search_sees_one_visible_version_per_key_and_travels_in_time(store: Store, clock: FakeClock) -> None:
    e0, e1 = basis((0, 1.0)), basis((1, 1.0))
    v1 = store.put("ns", "k", "old", vector=e0)
    clock.advance(1)
    v2 = store.put("ns", "k", "new", vector=e1)
    now_hits = store.search("ns", None, k=5, vector=e0)
    assert [(h.record, round(h.score, 6)) for h in now_hits] == [(v2, 0.0)]
    past_hits = store.search("ns", None, k=5, vector=e0, as_of=T0)
    assert [(h.record, round(h.score, 6)) for h in past_hits] == [(v1, 1.0)]
    clock.advance(1)
    store.delete("ns", "k")
    assert store.search("ns", None, k=5, vector=e0) == []
    assert [h.record for h in store.search("ns", None, k=5, vector=e0, as_of=T0 + S)] == [v2]


def test_search_valid_at(store: Store) -> None:
    y2020, y2022, y2024 = (T0.replace(year=n) for n in (2020, 2022, 2024))
    store.put("ns", "old", "old fact", valid_to=y2022, vector=basis((0, 1.0)))
    store.put("ns", "new", "new fact", valid_from=y2022, vector=basis((0, 1.0), (1, 0.5)))
    q = basis((0, 1.0))
    assert [h.record.key for h in store.search("ns", None, k=5, vector=q)] == ["old", "new"]
    assert [h.record.key for h in store.search("ns", None, k=5, vector=q, valid_at=y2020)] == ["old"]
    assert [h.record.key for h in store.search("ns", None, k=5, vector=q, valid_at=y2024)] == ["new"]


def test_search_by_text_ranks_the_matching_fact_first(store: Store) -> None:
    store.put("ns", "city", "Alice lives in Paris")
    store.put("ns", "music", "Bob likes jazz records")
    store.put("ns", "food", "Carol cooks pasta")
    hits = store.search("ns", "where does Alice live", k=3)
    assert hits[0].record.key == "city"
    assert len(hits) == 3 and hits[0].score > hits[1].score


def test_links_are_versioned(store: Store, clock: FakeClock) -> None:
    works = store.link("ns", "alice", "works_at", "acme", metadata={"since": 2020})
    clock.advance(1)
    knows = store.link("ns", "alice", "knows", "bob")
    clock.advance(1)
    carol = store.link("ns", "carol", "knows", "alice")
    assert store.neighbors("ns", "alice") == [knows, works]  # ordered by (src, relation, dst)
    assert store.neighbors("ns", "alice", direction="in") == [carol]
    assert store.neighbors("ns", "alice", direction="both") == [knows, works, carol]
    assert store.neighbors("ns", "alice", direction="both", relation="knows") == [knows, carol]
    clock.advance(1)
    moved = store.link("ns", "alice", "works_at", "acme", metadata={"since": 2021})
    assert (moved.version, moved.metadata, moved.committed_at) == (2, {"since": 2021}, T0 + 3 * S)
    clock.advance(1)
    gone = store.unlink("ns", "alice", "knows", "bob", actor="eve")
    assert (gone.version, gone.deleted, gone.actor) == (2, True, "eve")
    assert store.neighbors("ns", "alice") == [moved]
    assert store.neighbors("ns", "alice", as_of=T0 + S) == [knows, works]
    assert store.neighbors("ns", "alice", as_of=T0 - S) == []
    with pytest.raises(NotFound):
        store.unlink("ns", "alice", "knows", "bob")
    with pytest.raises(NotFound):
        store.unlink("ns", "alice", "never", "bob")
    relinked = store.link("ns", "alice", "knows", "bob")
    assert relinked.version == 3
    assert [(e.op, e.key, e.old_version, e.new_version) for e in store.audit("ns")][-3:] == [
        (Op.LINK, "alice|works_at|acme", 1, 2),
        (Op.UNLINK, "alice|knows|bob", 1, 2),
        (Op.LINK, "alice|knows|bob", 2, 3),
    ]


def test_links_valid_at(store: Store) -> None:
    y2020, y2022, y2024 = (T0.replace(year=n) for n in (2020, 2022, 2024))
    edge = store.link("ns", "a", "r", "b", valid_from=y2020, valid_to=y2022)
    assert store.neighbors("ns", "a", valid_at=y2020) == [edge]
    assert store.neighbors("ns", "a", valid_at=y2022) == []
    assert store.neighbors("ns", "a", valid_at=y2024) == []
    assert store.neighbors("ns", "a") == [edge]


def test_check_is_clean_then_reports_exactly_the_corruption_and_repair_fixes_it(store: Store) -> None:
    for i in range(4):
        store.put("ns", f"k{i}", f"fact number {i}")
    store.put("ns", "k0", "fact zero, second version")
    store.delete("ns", "k3")
    report = store.check()
    assert report.ok
    assert (report.records, report.indexed) == (6, 5)  # tombstones have no vector; old versions do
    ids = sorted(store.index.ids().tolist())  # row ids grow in commit order: k0, k1, k2, k3, k0 v2
    store.index.remove(np.array([ids[1]], dtype=np.int64))
    altered = store.index.vectors(np.array([ids[2]], dtype=np.int64)).copy()
    altered[0, :] = altered[0, ::-1]
    store.index.add(np.array([ids[2]], dtype=np.int64), altered)
    orphan = max(ids) + 1000
    store.index.add(np.array([orphan], dtype=np.int64), basis((5, 1.0))[None, :])
    report = store.check()
    assert (report.missing, report.stale, report.orphans, report.broken_chains) == ([ids[1]], [ids[2]], [orphan], [])
    assert not report.ok
    repaired = store.repair()
    assert repaired.ok and repaired.indexed == 5
    assert store.check().ok
    entry = store.audit("*")[-1]
    assert (entry.op, entry.key) == (Op.REPAIR, "index")
    assert entry.reason is not None and "1 missing, 1 stale, 1 orphan" in entry.reason
    assert store.search("ns", "fact number 1", k=1)[0].record.key == "k1"


def drop_live_row(store: Store, rowid: int) -> None:
    """Corrupt the derived live rows behind the store's back (in memory, or pgvector's table)."""
    if getattr(store._dialect, "vector_search", False):  # type: ignore[attr-defined]
        store._conn.execute("DELETE FROM live_vectors WHERE record_id = %s", [rowid])  # type: ignore[attr-defined]
    else:
        live = store._live.index("ns")  # type: ignore[attr-defined]
        assert live is not None and len(live) == 3  # one row per key: k0's first version is not live
        live.remove(np.array([rowid], dtype=np.int64))


def test_check_reports_live_rows_that_disagree_with_the_records_and_repair_fixes_them(store: Store) -> None:
    """The live rows (what a search "now" reads) are derived data too: check() compares them with
    the visible rows computed by SQL, and repair() rebuilds them."""
    for i in range(3):
        store.put("ns", f"k{i}", f"fact number {i}", vector=basis((i, 1.0)))
    store.put("ns", "k0", "fact zero, second version", vector=basis((0, 1.0)))
    assert store.check().ok
    k1_row = max(store.index.search(basis((1, 1.0)), 1)[0].tolist())
    drop_live_row(store, k1_row)
    assert [h.record.key for h in store.search("ns", None, k=1, vector=basis((1, 1.0)))] != ["k1"]
    report = store.check()
    assert report.live_mismatch == [k1_row] and not report.ok
    assert store.repair().ok
    assert [h.record.key for h in store.search("ns", None, k=1, vector=basis((1, 1.0)))] == ["k1"]
    assert "1 live-view mismatches" in (store.audit("*")[-1].reason or "")


def test_a_repeated_filtered_search_follows_every_change(store: Store, clock: FakeClock) -> None:
    """Filtered searches may reuse work between calls; each change must still show at once."""
    q = basis((0, 1.0))

    def keys() -> list[str]:
        return sorted(h.record.key for h in store.search("ns", None, k=10, vector=q, filter={"tag": "x"}))

    store.put("ns", "a", "a", metadata={"tag": "x"}, vector=basis((0, 1.0)))
    store.put("ns", "b", "b", metadata={"tag": "y"}, vector=basis((0, 1.0)))
    assert keys() == ["a"]
    store.put("ns", "c", "c", metadata={"tag": "x"}, vector=basis((0, 1.0), (1, 0.5)), ttl=5)
    assert keys() == ["a", "c"]
    store.put("ns", "b", "b2", metadata={"tag": "x"}, vector=basis((0, 1.0)))  # b now matches
    assert keys() == ["a", "b", "c"]
    store.put("ns", "a", "a2", metadata={"tag": "y"}, vector=basis((0, 1.0)))  # a no longer matches
    assert keys() == ["b", "c"]
    store.delete("ns", "b")
    assert keys() == ["c"]
    clock.advance(5)  # c expires
    assert keys() == []
    store.put("other", "d", "d", metadata={"tag": "x"}, vector=basis((0, 1.0)))  # another namespace
    assert keys() == []
