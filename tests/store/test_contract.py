"""The Store contract, part 1: versions, time travel, validity, CAS, conflict policies, audit,
TTL, namespaces, persistence. Runs on every backend in ``conftest.BACKENDS``.

Expected values are written out by hand from the semantics in ``memfusion.store.base``; the
fixture's clock is frozen at ``T0`` and only moves when a test advances it, so commit times
are exact (a key's next version is ``max(now, previous + 1 µs)``).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from memfusion.errors import InvalidInput, NotFound, VersionConflict
from memfusion.store import ConflictPolicy, Op, PutItem, Record, Store, Write
from tests.store.conftest import T0, FakeClock, Opener

S = timedelta(seconds=1)
US = timedelta(microseconds=1)


def test_issue_walkthrough(store: Store, clock: FakeClock) -> None:
    r1 = store.put("alice", "city", "Alice lives in Paris", metadata={"src": "chat-12"})
    clock.advance(1)
    r2 = store.put("alice", "city", "Alice moved to Berlin", expected_version=r1.version)
    assert (r1.version, r1.committed_at, r2.version, r2.committed_at) == (1, T0, 2, T0 + S)
    assert store.get("alice", "city").text == "Alice moved to Berlin"
    assert store.get("alice", "city", as_of=r1.committed_at).text == "Alice lives in Paris"
    assert store.history("alice", "city") == [r1, r2]
    hits = store.search("alice", "where does she live?", k=5)
    assert [h.record for h in hits] == [r2]
    # the filter sees the visible version's metadata: version 2 has none
    assert store.search("alice", "where does she live?", k=5, filter={"src": "chat-12"}) == []
    assert store.search("alice", "live", k=5, filter={"src": "chat-12"}, as_of=T0)[0].record == r1
    tomb = store.delete("alice", "city")
    assert (tomb.version, tomb.deleted, tomb.text) == (3, True, "")
    with pytest.raises(NotFound):
        store.get("alice", "city")
    assert [r.version for r in store.history("alice", "city")] == [1, 2, 3]
    edge = store.link("alice", "alice", "works_at", "acme")
    assert store.neighbors("alice", "alice") == [edge]
    assert store.check().ok


def test_versions_are_appended_with_strictly_increasing_commit_times(store: Store) -> None:
    written = [store.put("ns", "k", f"v{i}", actor=f"a{i}", reason=f"r{i}") for i in range(3)]
    tomb = store.delete("ns", "k", actor="ad", reason="gone")
    back = store.put("ns", "k", "back")
    hist = store.history("ns", "k")
    assert hist == [*written, tomb, back]
    assert [(h.version, h.text, h.deleted, h.actor, h.reason) for h in hist] == [
        (1, "v0", False, "a0", "r0"),
        (2, "v1", False, "a1", "r1"),
        (3, "v2", False, "a2", "r2"),
        (4, "", True, "ad", "gone"),
        (5, "back", False, "memfusion", None),
    ]
    # the clock is frozen: each version is 1 µs after the previous one of the same key
    assert [h.committed_at for h in hist] == [T0 + i * US for i in range(5)]
    assert store.put("ns", "other", "x").committed_at == T0  # per key
    assert store.history("ns", "never") == []


def test_as_of_sees_each_step(store: Store, clock: FakeClock) -> None:
    store.put("ns", "k", "a")
    clock.advance(1)
    store.put("ns", "k", "b")
    clock.advance(1)
    store.delete("ns", "k")
    clock.advance(1)
    store.put("ns", "k", "c")
    expected = {T0 - US: None, T0: "a", T0 + S / 2: "a", T0 + S: "b", T0 + 2 * S: None, T0 + 3 * S: "c"}
    for t, text in expected.items():
        if text is None:
            with pytest.raises(NotFound):
                store.get("ns", "k", as_of=t)
        else:
            assert store.get("ns", "k", as_of=t).text == text
    assert store.get("ns", "k").version == 4


def test_valid_at_is_separate_from_commit_time(store: Store, clock: FakeClock) -> None:
    y = {n: T0.replace(year=n) for n in (2019, 2020, 2021, 2023, 2024)}
    store.put("ns", "city", "Paris", valid_from=y[2020], valid_to=y[2023])
    clock.advance(1)
    berlin = store.put("ns", "city", "Berlin", valid_from=y[2023])
    assert store.get("ns", "city").text == "Berlin"  # no valid_at: the latest version
    assert store.get("ns", "city", valid_at=y[2021]).text == "Paris"  # the latest version valid then
    assert store.get("ns", "city", valid_at=y[2023]) == berlin  # valid_to is exclusive
    assert store.get("ns", "city", valid_at=y[2024]) == berlin
    with pytest.raises(NotFound):
        store.get("ns", "city", valid_at=y[2019])
    with pytest.raises(NotFound):  # as of the first commit, nothing was known about 2024
        store.get("ns", "city", as_of=T0, valid_at=y[2024])
    assert berlin.valid_at(y[2024]) and not berlin.valid_at(y[2021])
    clock.advance(1)
    store.delete("ns", "city")
    with pytest.raises(NotFound):  # a tombstone hides every validity period
        store.get("ns", "city", valid_at=y[2021])


def test_compare_and_set(store: Store) -> None:
    assert store.put("ns", "k", "one", expected_version=0).version == 1
    with pytest.raises(VersionConflict) as err:
        store.put("ns", "k", "two", expected_version=0)
    assert err.value.current_version == 1
    assert store.put("ns", "k", "two", expected_version=1).version == 2
    with pytest.raises(VersionConflict) as err:
        store.put("ns", "k", "stale", expected_version=1)
    assert err.value.current_version == 2
    with pytest.raises(VersionConflict) as err:
        store.delete("ns", "k", expected_version=1)
    assert err.value.current_version == 2
    assert store.delete("ns", "k", expected_version=2).version == 3
    with pytest.raises(VersionConflict) as err:
        store.put("ns", "k", "x", expected_version=2)
    assert err.value.current_version == 3
    assert store.put("ns", "k", "three", expected_version=3).version == 4
    assert [(r.version, r.text) for r in store.history("ns", "k")] == [(1, "one"), (2, "two"), (3, ""), (4, "three")]
    # refused compare-and-set writes change nothing, not even the audit log
    assert [(e.op, e.old_version, e.new_version) for e in store.audit("ns")] == [
        (Op.PUT, None, 1),
        (Op.PUT, 1, 2),
        (Op.DELETE, 2, 3),
        (Op.PUT, 3, 4),
    ]


def test_last_writer_wins_is_the_default_and_audited(store: Store) -> None:
    store.put("ns", "k", "a")
    assert store.put("ns", "k", "b").version == 2
    assert [e.policy for e in store.audit("ns")] == [None, "last_writer_wins"]


def test_reject_policy(store: Store) -> None:
    store.put("ns", "k", "first")
    with pytest.raises(VersionConflict) as err:
        store.put("ns", "k", "second", on_conflict=ConflictPolicy.REJECT, actor="bob", reason="try")
    assert err.value.current_version == 1
    assert store.get("ns", "k").text == "first"
    last = store.audit("ns")[-1]
    assert (last.op, last.key, last.old_version, last.new_version, last.policy, last.actor, last.reason) == (
        Op.REJECT, "k", 1, None, "reject", "bob", "try",
    )  # fmt: skip
    store.delete("ns", "k")  # no live record: nothing to conflict with
    assert store.put("ns", "k", "again", on_conflict="reject").version == 3
    assert store.audit("ns")[-1].policy is None


def test_keep_both_policy(store: Store) -> None:
    store.put("ns", "city", "Paris")
    second = store.put("ns", "city", "Berlin", on_conflict=ConflictPolicy.KEEP_BOTH)
    third = store.put("ns", "city", "Rome", on_conflict=ConflictPolicy.KEEP_BOTH)
    assert [(second.key, second.version), (third.key, third.version)] == [("city#2", 1), ("city#3", 1)]
    assert [store.get("ns", k).text for k in ("city", "city#2", "city#3")] == ["Paris", "Berlin", "Rome"]
    assert {h.record.key for h in store.search("ns", "city", k=10)} == {"city", "city#2", "city#3"}
    store.delete("ns", "city#2")
    fourth = store.put("ns", "city", "Oslo", on_conflict=ConflictPolicy.KEEP_BOTH)
    assert (fourth.key, fourth.version) == ("city#2", 3)  # the first key#n with no live version
    assert [(e.key, e.policy) for e in store.audit("ns") if e.op is Op.PUT] == [
        ("city", None), ("city#2", "keep_both"), ("city#3", "keep_both"), ("city#2", "keep_both"),
    ]  # fmt: skip


def test_callback_policy_merges_and_is_audited(store: Store) -> None:
    seen: list[tuple[Record, Write]] = []

    def merge(current: Record, incoming: Write) -> Write:
        seen.append((current, incoming))
        return Write(f"{current.text}; {incoming.text}", {**current.metadata, **incoming.metadata})

    first = store.put("ns", "k", "likes tea", metadata={"a": 1}, on_conflict=merge)
    assert seen == []  # no live record: the callback is not asked
    merged = store.put("ns", "k", "likes jazz", metadata={"b": 2}, on_conflict=merge)
    assert seen == [(first, Write("likes jazz", {"b": 2}))]
    assert (merged.version, merged.text, merged.metadata) == (2, "likes tea; likes jazz", {"a": 1, "b": 2})
    assert store.get("ns", "k") == merged
    assert store.search("ns", "tea jazz", k=1)[0].record == merged  # embedded from the merged text
    with pytest.raises(VersionConflict) as err:
        store.put("ns", "k", "no", on_conflict=lambda cur, inc: ConflictPolicy.REJECT)
    assert err.value.current_version == 2
    kept = store.put("ns", "k", "both", on_conflict=lambda cur, inc: ConflictPolicy.KEEP_BOTH)
    assert (kept.key, kept.version) == ("k#2", 1)
    assert [(e.op, e.key, e.policy) for e in store.audit("ns")] == [
        (Op.PUT, "k", None),
        (Op.PUT, "k", "callback:merge"),
        (Op.REJECT, "k", "callback:reject"),
        (Op.PUT, "k#2", "callback:keep_both"),
    ]


def test_audit_log_is_exact(store: Store, clock: FakeClock) -> None:
    store.put("ns", "a", "x", actor="ann", reason="first")
    clock.advance(1)
    store.put("ns", "a", "y", actor="bob")
    clock.advance(1)
    store.delete("ns", "a", actor="cat", reason="wrong")
    clock.advance(1)
    store.link("ns", "a", "rel", "b", actor="dan")
    clock.advance(1)
    store.unlink("ns", "a", "rel", "b", actor="eve")
    store.put("other", "a", "elsewhere")
    entries = store.audit("ns")
    assert [(e.op, e.key, e.actor, e.at, e.old_version, e.new_version, e.policy, e.reason) for e in entries] == [
        (Op.PUT, "a", "ann", T0, None, 1, None, "first"),
        (Op.PUT, "a", "bob", T0 + S, 1, 2, "last_writer_wins", None),
        (Op.DELETE, "a", "cat", T0 + 2 * S, 2, 3, None, "wrong"),
        (Op.LINK, "a|rel|b", "dan", T0 + 3 * S, None, 1, None, None),
        (Op.UNLINK, "a|rel|b", "eve", T0 + 4 * S, 1, 2, None, None),
    ]
    assert all(e.namespace == "ns" for e in entries)
    seqs = [e.seq for e in entries]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert [e.op for e in store.audit("ns", since=T0 + S)] == [Op.DELETE, Op.LINK, Op.UNLINK]
    assert store.audit("ns", limit=2) == entries[:2]
    assert [(e.op, e.key) for e in store.audit("other")] == [(Op.PUT, "a")]
    assert store.audit("empty") == []


def test_ttl_hides_expired_records_until_compact(store: Store, clock: FakeClock) -> None:
    temp = store.put("ns", "k", "temporary fact", ttl=10)
    keep = store.put("ns", "stay", "permanent fact")
    assert temp.expires_at == T0 + 10 * S and keep.expires_at is None
    clock.advance(5)
    assert store.get("ns", "k") == temp
    assert {h.record.key for h in store.search("ns", "fact", k=5)} == {"k", "stay"}
    clock.advance(5)  # expires_at is exclusive: at T0 + 10 s it is gone
    with pytest.raises(NotFound):
        store.get("ns", "k")
    assert [h.record.key for h in store.search("ns", "fact", k=5)] == ["stay"]
    assert store.get("ns", "k", as_of=T0 + 5 * S) == temp  # expiry is judged at as_of
    assert store.history("ns", "k") == [temp]  # kept in history until compact
    with pytest.raises(NotFound):
        store.delete("ns", "k")
    again = store.put("ns", "k", "renewed", on_conflict=ConflictPolicy.REJECT)  # nothing live to conflict
    assert again.version == 2
    assert store.compact() == 1
    assert store.history("ns", "k") == [again]
    with pytest.raises(NotFound):  # compaction erased version 1
        store.get("ns", "k", as_of=T0 + 5 * S)
    compacted = store.audit("ns")[-1]
    assert (compacted.op, compacted.key, compacted.old_version, compacted.new_version) == (Op.COMPACT, "k", 1, None)
    assert store.compact() == 0
    report = store.check()
    assert report.ok and report.indexed == 2


def test_compact_is_per_namespace(store: Store, clock: FakeClock) -> None:
    store.put("a", "k", "x", ttl=1)
    store.put("b", "k", "x", ttl=1)
    clock.advance(2)
    assert store.compact("a") == 1
    assert (len(store.history("a", "k")), len(store.history("b", "k"))) == (0, 1)


def test_namespaces_are_isolated(store: Store) -> None:
    store.put("t1", "k", "tenant one secret", metadata={"x": 1})
    store.put("t2", "k", "tenant two secret", metadata={"x": 1})
    store.link("t1", "k", "rel", "z")
    assert store.get("t1", "k").text == "tenant one secret"
    assert [h.record.namespace for h in store.search("t2", "tenant secret", k=10, filter={"x": 1})] == ["t2"]
    store.delete("t1", "k")
    assert store.get("t2", "k").version == 1
    assert [r.version for r in store.history("t2", "k")] == [1]
    assert store.neighbors("t2", "k") == []
    assert [e.op for e in store.audit("t2")] == [Op.PUT]
    with pytest.raises(NotFound):
        store.get("t3", "k")


def test_reopen_keeps_everything(open_db: Opener, clock: FakeClock) -> None:
    first = open_db()
    r = first.put("ns", "k", "durable fact", metadata={"m": [1, 2]})
    e = first.link("ns", "k", "rel", "other")
    first.close()
    again = open_db()
    assert again.history("ns", "k") == [r]
    assert again.neighbors("ns", "k") == [e]
    assert [h.record for h in again.search("ns", "durable", k=3)] == [r]
    assert again.check().ok


def test_two_store_objects_see_each_others_writes(open_db: Opener, clock: FakeClock) -> None:
    a, b = open_db(), open_db()
    b.search("ns", "anything", k=1)  # b's index is now built
    r = a.put("ns", "k", "written by a", ttl=5)
    assert [h.record for h in b.search("ns", "written", k=3)] == [r]  # b catches up before searching
    assert b.check().ok
    clock.advance(5)
    assert a.compact() == 1
    assert b.check().ok and len(b.index) == 0  # b rebuilt its index after a's compaction


def test_threads_share_one_store(store: Store) -> None:
    conflicts = [0] * 4

    def worker(slot: int) -> None:
        done = 0
        while done < 25:
            try:
                current = store.get("ns", "counter")
                value, version = int(current.text), current.version
            except NotFound:
                value, version = 0, 0
            try:
                store.put("ns", "counter", str(value + 1), expected_version=version)
                done += 1
            except VersionConflict:
                conflicts[slot] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hist = store.history("ns", "counter")
    assert [r.text for r in hist] == [str(v) for v in range(1, 101)]
    assert [r.version for r in hist] == list(range(1, 101))


def test_put_many_is_ordered_puts_in_one_transaction(store: Store, clock: FakeClock) -> None:
    store.put("ns", "a", "a one")
    records = store.put_many(
        "ns",
        [
            {"key": "a", "text": "a two", "expected_version": 1},
            {"key": "b", "text": "b one", "metadata": {"m": 1}, "ttl": 10},
            PutItem(key="a", text="a three"),  # a key twice in one batch: the later item is the next version
        ],
        actor="batch",
        reason="import",
    )
    assert [(r.key, r.version, r.text, r.actor, r.reason) for r in records] == [
        ("a", 2, "a two", "batch", "import"),
        ("b", 1, "b one", "batch", "import"),
        ("a", 3, "a three", "batch", "import"),
    ]
    assert records[1].metadata == {"m": 1} and records[1].expires_at == T0 + 10 * S
    assert store.history("ns", "a")[1:] == [records[0], records[2]]
    assert store.get("ns", "b") == records[1]
    assert {h.record.key for h in store.search("ns", "one three", k=5)} == {"a", "b"}  # one live row per key
    assert [(e.op, e.key, e.new_version) for e in store.audit("ns")[1:]] == [
        (Op.PUT, "a", 2),
        (Op.PUT, "b", 1),
        (Op.PUT, "a", 3),
    ]
    assert store.put_many("ns", []) == []
    assert store.check().ok


def test_put_many_is_all_or_nothing(store: Store) -> None:
    store.put("ns", "a", "a one")
    before = (store.history("ns", "a"), store.audit("ns"))
    with pytest.raises(VersionConflict) as err:
        store.put_many("ns", [{"key": "b", "text": "b one"}, {"key": "a", "text": "stale", "expected_version": 7}])
    assert err.value.current_version == 1
    with pytest.raises(VersionConflict):
        store.put_many("ns", [{"key": "c", "text": "c"}, {"key": "a", "text": "x"}], on_conflict=ConflictPolicy.REJECT)
    with pytest.raises(InvalidInput, match="item 1 needs 'key' and 'text'"):
        store.put_many("ns", [{"key": "b", "text": "b"}, {"key": "c", "txt": "typo"}])
    with pytest.raises(InvalidInput, match="empty"):
        store.put_many("ns", [{"key": "b", "text": "b"}, {"key": "c", "text": ""}])
    with pytest.raises(InvalidInput, match="iterable of PutItem"):
        store.put_many("ns", {"key": "b", "text": "b"})  # type: ignore[arg-type]
    assert (store.history("ns", "a"), store.audit("ns")) == before
    for key in ("b", "c"):
        with pytest.raises(NotFound):
            store.get("ns", key)
    assert store.search("ns", "b one", k=5)[0].record.key == "a"
    assert store.check().ok
