"""Random put / delete / get / as_of / valid_at / search / history sequences against a plain
in-memory model of the semantics (hypothesis stateful testing).

The model is a list of versions per (namespace, key) and the visibility rule of
``memfusion.store.versions`` written out directly in Python; the store runs on each backend
(SQLite, and PostgreSQL with pgvector) with a frozen, manually advanced clock so commit times
are predictable.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from memfusion.errors import NotFound, VersionConflict
from memfusion.store import open_store
from memfusion.store.embed import HashingEmbedder
from tests.store.conftest import T0, FakeClock, pg_url

US = timedelta(microseconds=1)
YEARS = [T0.replace(year=y) for y in range(2020, 2025)]
namespaces = st.sampled_from(["n1", "n2"])
keys = st.sampled_from(["a", "b", "c"])
texts = st.text(alphabet="abc xyz", min_size=1, max_size=10).filter(lambda t: bool(t.strip()))
maybe_year = st.none() | st.sampled_from(YEARS)


@dataclass(frozen=True)
class Version:
    text: str
    deleted: bool
    committed: datetime
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    expires: datetime | None = None

    def valid_at(self, t: datetime) -> bool:
        return (self.valid_from is None or self.valid_from <= t) and (self.valid_to is None or t < self.valid_to)


class StoreModel(RuleBasedStateMachine):
    backend = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="memfusion-model-")
        self.url = f"sqlite:///{self.dir}/m.db" if self.backend == "sqlite" else pg_url(Path(self.dir))
        self.clock = FakeClock()
        self.store = open_store(self.url, embedder=HashingEmbedder(16), clock=self.clock)
        self.model: dict[tuple[str, str], list[Version]] = {}
        self.instants: list[datetime] = [T0 - US, T0]

    def teardown(self) -> None:
        try:
            assert self.store.check().ok
        finally:
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model ---------------------------------------------------------------------------

    def visible(self, ns: str, key: str, as_of: datetime | None, valid_at: datetime | None) -> Version | None:
        versions = self.model.get((ns, key), [])
        if as_of is not None:
            versions = [v for v in versions if v.committed <= as_of]
        if valid_at is not None:
            versions = [v for v in versions if v.deleted or v.valid_at(valid_at)]
        if not versions:
            return None
        last, t = versions[-1], as_of or self.clock.now
        return None if last.deleted or (last.expires is not None and last.expires <= t) else last

    def next_commit(self, ns: str, key: str) -> datetime:
        versions = self.model.get((ns, key), [])
        return self.clock.now if not versions else max(self.clock.now, versions[-1].committed + US)

    def append(self, ns: str, key: str, version: Version) -> int:
        self.model.setdefault((ns, key), []).append(version)
        self.instants += [version.committed, version.committed - US]
        if version.expires is not None:
            self.instants += [version.expires, version.expires - US]
        return len(self.model[(ns, key)])

    # -- rules -------------------------------------------------------------------------------

    @rule(ns=namespaces, key=keys, text=texts, ttl=st.none() | st.integers(1, 4), start=maybe_year, end=maybe_year)
    def put(self, ns: str, key: str, text: str, ttl: int | None, start: datetime | None, end: datetime | None) -> None:
        if start is not None and end is not None and start >= end:
            start, end = (end, start) if start > end else (start, None)
        committed = self.next_commit(ns, key)
        expires = None if ttl is None else committed + timedelta(seconds=ttl)
        rec = self.store.put(ns, key, text, ttl=ttl, valid_from=start, valid_to=end)
        version = self.append(ns, key, Version(text, False, committed, start, end, expires))
        assert (rec.version, rec.text, rec.committed_at, rec.expires_at) == (version, text, committed, expires)

    @rule(ns=namespaces, key=keys, text=texts, offset=st.sampled_from([0, 0, 1, -1]))
    def compare_and_set(self, ns: str, key: str, text: str, offset: int) -> None:
        current = len(self.model.get((ns, key), []))
        expected = max(0, current + offset)
        if expected != current:
            try:
                self.store.put(ns, key, text, expected_version=expected)
            except VersionConflict as err:
                assert err.current_version == current
            else:
                raise AssertionError("a stale compare-and-set was accepted")
            return
        committed = self.next_commit(ns, key)
        rec = self.store.put(ns, key, text, expected_version=expected)
        assert rec.version == self.append(ns, key, Version(text, False, committed))

    @rule(ns=namespaces, key=keys)
    def delete(self, ns: str, key: str) -> None:
        if self.visible(ns, key, None, None) is None:
            try:
                self.store.delete(ns, key)
            except NotFound:
                return
            raise AssertionError("deleting a key with no live version succeeded")
        committed = self.next_commit(ns, key)
        rec = self.store.delete(ns, key)
        assert rec.deleted and rec.version == self.append(ns, key, Version("", True, committed))

    @rule(seconds=st.sampled_from([0, 1, 2, 5]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(ns=namespaces, key=keys, data=st.data(), valid_at=maybe_year)
    def get(self, ns: str, key: str, data: st.DataObject, valid_at: datetime | None) -> None:
        as_of = data.draw(st.none() | st.sampled_from(self.instants), label="as_of")
        want = self.visible(ns, key, as_of, valid_at)
        try:
            got = self.store.get(ns, key, as_of=as_of, valid_at=valid_at)
        except NotFound:
            assert want is None
            return
        assert want is not None
        assert (got.text, got.committed_at, got.valid_from, got.valid_to) == (
            want.text, want.committed, want.valid_from, want.valid_to,
        )  # fmt: skip

    @rule(ns=namespaces, key=keys)
    def expiry_boundary(self, ns: str, key: str) -> None:
        """At exactly ``expires_at`` a version is gone; 1 µs before, it is not."""
        expiries = [v.expires for v in self.model.get((ns, key), []) if v.expires is not None]
        for t in [] if not expiries else [expiries[-1], expiries[-1] - US]:
            want = self.visible(ns, key, t, None)
            try:
                got: str | None = self.store.get(ns, key, as_of=t).text
            except NotFound:
                got = None
            assert got == (None if want is None else want.text)

    @rule(ns=namespaces, data=st.data(), valid_at=maybe_year)
    def search_sees_exactly_the_visible_keys(self, ns: str, data: st.DataObject, valid_at: datetime | None) -> None:
        as_of = data.draw(st.none() | st.sampled_from(self.instants), label="as_of")
        want = {}
        for key in ("a", "b", "c"):
            version = self.visible(ns, key, as_of, valid_at)
            if version is not None:
                want[key] = version.text
        hits = self.store.search(ns, "abc xyz", k=10, as_of=as_of, valid_at=valid_at)
        assert {h.record.key: h.record.text for h in hits} == want

    @rule(ns=namespaces, key=keys)
    def history(self, ns: str, key: str) -> None:
        got = [(r.version, r.text, r.deleted, r.committed_at) for r in self.store.history(ns, key)]
        want = [(i + 1, v.text, v.deleted, v.committed) for i, v in enumerate(self.model.get((ns, key), []))]
        assert got == want

    @precondition(lambda self: bool(self.model))
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = open_store(self.url, embedder=HashingEmbedder(16), clock=self.clock)


class PostgresStoreModel(StoreModel):
    backend = "postgresql"


for machine in (StoreModel, PostgresStoreModel):
    machine.TestCase.settings = settings(
        max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
TestStoreModel = StoreModel.TestCase
TestPostgresStoreModel = PostgresStoreModel.TestCase
