"""The store semantics, implemented once over a DB-API connection and a :class:`Dialect`.

Tables (see :meth:`Dialect.ddl`): ``records`` and ``edges`` hold append-only version rows,
``audit`` the append-only log, ``meta`` the schema version, the embedder (name, dim) and the
index *generation* (bumped by ``compact``, the only in-place change of rows).

Invariants:

- every mutation runs in ONE transaction opened by ``dialect.begin_write`` (the write lock):
  read the key's latest version, append ``latest + 1`` with
  ``committed_at = max(now, previous committed_at + 1 µs)``, append the audit line, commit;
  so versions are ``1..n`` per key with strictly increasing ``committed_at``, and two writers
  never both append the same version;
- input is validated before the transaction starts: bad input changes nothing;
- a conflict policy applies only to a write without ``expected_version`` that finds a live
  latest version; KEEP_BOTH writes to the first ``key#n`` (n >= 2) with no live version;
- plumbing (connection, transactions, meta, index sync) is in :mod:`memfusion.store.sqlbase`,
  edges in :mod:`memfusion.store.graph`, audit/check/repair/compact in
  :mod:`memfusion.store.maintenance`; visibility rules in :mod:`memfusion.store.versions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

import numpy as np

from memfusion.errors import InvalidInput, NotFound, VersionConflict
from memfusion.store.base import (
    Store,
    check_filter,
    check_k,
    check_key,
    check_metadata,
    check_namespace,
    check_text,
    check_time,
    check_vector,
)
from memfusion.store.dialect import dump_json, from_us, opt_us, to_us
from memfusion.store.graph import GraphMixin
from memfusion.store.live import RowChange
from memfusion.store.maintenance import MaintenanceMixin
from memfusion.store.options import (
    check_actor,
    check_expected_version,
    check_interval,
    check_policy,
    check_reason,
    check_resolution,
    check_ttl,
)
from memfusion.store.records import (
    JSON,
    ConflictPolicy,
    Hit,
    Op,
    PutItem,
    Record,
    Resolver,
    Write,
)
from memfusion.store.versions import (
    RECORD_COLS,
    append_record,
    is_live,
    latest_record,
    record_from_row,
    visible_records_sql,
)

#: Filtered searches of the current facts remember this many (namespace, filter) candidate sets.
FILTER_CACHE_SIZE = 64


class _Rejected:
    """A write refused by the REJECT policy: its audit line is committed, then it raises."""

    def __init__(self, current_version: int) -> None:
        self.current_version = current_version


@dataclass(frozen=True)
class _Checked:
    """A validated :class:`PutItem` (``vector`` None: embed ``write.text``)."""

    key: str
    write: Write
    expected: int | None
    ttl: float | None
    interval: tuple[datetime | None, datetime | None]
    vector: np.ndarray | None


_ITEM_FIELDS = {f.name for f in fields(PutItem)}


def _as_item(item: Any, n: int) -> PutItem:
    if isinstance(item, PutItem):
        return item
    if not isinstance(item, Mapping):
        raise InvalidInput(f"put_many item {n} must be a PutItem or a dict, got {type(item).__name__}")
    unknown = set(item) - _ITEM_FIELDS
    if unknown or "key" not in item or "text" not in item:
        raise InvalidInput(
            f"put_many item {n} needs 'key' and 'text' and may carry {sorted(_ITEM_FIELDS - {'key', 'text'})}; "
            f"got {sorted(item)}"
        )
    return PutItem(**item)


def _checked(item: PutItem, dim: int) -> _Checked:
    return _Checked(
        key=check_key(item.key),
        write=Write(text=check_text(item.text), metadata=check_metadata(item.metadata)),
        expected=check_expected_version(item.expected_version),
        ttl=check_ttl(item.ttl),
        interval=check_interval(item.valid_from, item.valid_to),
        vector=None if item.vector is None else check_vector(item.vector, dim),
    )


def _conflict(ns: str, key: str, rejected: _Rejected) -> VersionConflict:
    return VersionConflict(
        f"{ns}/{key} already holds a live version {rejected.current_version} and on_conflict rejects "
        f"overwrites: pass expected_version={rejected.current_version} to replace it",
        rejected.current_version,
    )


class SQLStore(GraphMixin, MaintenanceMixin, Store):
    """:class:`Store` over one DB-API connection and a :class:`Dialect` (thread-safe)."""

    def put(
        self,
        namespace: str,
        key: str,
        text: str,
        *,
        metadata: dict[str, JSON] | None = None,
        expected_version: int | None = None,
        actor: str = "memfusion",
        reason: str | None = None,
        ttl: float | None = None,
        valid_from: datetime | None = None,
        valid_to: datetime | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        on_conflict: ConflictPolicy | Resolver = ConflictPolicy.LAST_WRITER_WINS,
    ) -> Record:
        ns = check_namespace(namespace)
        item = PutItem(key, text, metadata, expected_version, ttl, valid_from, valid_to, vector)
        return self._put_batch(ns, [item], actor, reason, on_conflict)[0]

    def put_many(
        self,
        namespace: str,
        items: Iterable[PutItem | Mapping[str, Any]],
        *,
        actor: str = "memfusion",
        reason: str | None = None,
        on_conflict: ConflictPolicy | Resolver = ConflictPolicy.LAST_WRITER_WINS,
    ) -> list[Record]:
        ns = check_namespace(namespace)
        if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
            raise InvalidInput("put_many takes an iterable of PutItem or dicts (key=..., text=..., ...)")
        return self._put_batch(ns, [_as_item(i, n) for n, i in enumerate(items)], actor, reason, on_conflict)

    def _put_batch(
        self, ns: str, items: list[PutItem], actor: str, reason: str | None, on_conflict: ConflictPolicy | Resolver
    ) -> list[Record]:
        """Validate everything, embed in one batch, then append every item in ONE transaction."""
        policy, actor, reason = check_policy(on_conflict), check_actor(actor), check_reason(reason)
        checked = [_checked(item, self.embedder.dim) for item in items]
        texts = [c.write.text for c in checked if c.vector is None]
        embedded = iter(self._embed_many(texts))
        vecs = [c.vector if c.vector is not None else next(embedded) for c in checked]
        if not checked:
            return []
        with self._lock:
            outcomes: list[tuple[int, Record, np.ndarray]] = []
            rejected: _Rejected | None = None
            with self._txn(write=True) as cur:
                for c, vec in zip(checked, vecs, strict=True):
                    outcome = self._put_locked(
                        cur,
                        ns,
                        c.key,
                        c.write,
                        vec,
                        c.vector is not None,
                        c.expected,
                        policy,
                        actor,
                        reason,
                        c.ttl,
                        c.interval,
                    )
                    if isinstance(outcome, _Rejected):
                        if len(checked) > 1:  # a batch is all or nothing: roll back, audit line included
                            raise _conflict(ns, c.key, outcome)
                        rejected = outcome  # one put commits the audit line of its rejection, then raises
                        break
                    outcomes.append(outcome)
            if rejected is not None:
                raise _conflict(ns, checked[0].key, rejected)
            self._applied([self._change(rowid, record, vec) for rowid, record, vec in outcomes])
        return [record for _, record, _ in outcomes]

    def _embed_many(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        out = self.embedder.embed(texts)
        return [check_vector(v, self.embedder.dim) for v in out]

    def _put_locked(
        self,
        cur: Any,
        ns: str,
        key: str,
        write: Write,
        vec: np.ndarray,
        fixed_vector: bool,
        expected: int | None,
        policy: ConflictPolicy | Resolver,
        actor: str,
        reason: str | None,
        ttl: float | None,
        interval: tuple[datetime | None, datetime | None],
    ) -> tuple[int, Record, np.ndarray] | _Rejected:
        now = self._now()
        latest = latest_record(cur, self._dialect, ns, key)
        current = 0 if latest is None else latest[1].version
        label: str | None = None
        if expected is not None:
            if current != expected:
                raise VersionConflict(
                    f"{ns}/{key} is at version {current}, not {expected}: re-read it and retry", current
                )
        elif latest is not None and is_live(latest, now):
            choice: ConflictPolicy
            if isinstance(policy, ConflictPolicy):
                choice, label = policy, policy.value
            else:
                resolution = check_resolution(policy(latest[1], write))
                if isinstance(resolution, Write):
                    choice, label = ConflictPolicy.LAST_WRITER_WINS, "callback:merge"
                    if resolution.text != write.text and not fixed_vector:
                        vec = self._embed(resolution.text)
                    write = resolution
                else:
                    choice, label = resolution, f"callback:{resolution.value}"
            if choice is ConflictPolicy.REJECT:
                self._audit(
                    cur,
                    namespace=ns,
                    key=key,
                    op=Op.REJECT,
                    actor=actor,
                    at=now,
                    old_version=current,
                    new_version=None,
                    policy=label,
                    reason=reason,
                )
                return _Rejected(current)
            if choice is ConflictPolicy.KEEP_BOTH:
                key, latest = self._free_key(cur, ns, key, now)
                current = 0 if latest is None else latest[1].version
        committed = now if latest is None else max(now, to_us(latest[1].committed_at) + 1)
        expires = None if ttl is None else committed + round(ttl * 1_000_000)
        rowid = append_record(
            cur,
            self._dialect,
            namespace=ns,
            key=key,
            version=current + 1,
            text=write.text,
            metadata=write.metadata,
            committed_at=committed,
            actor=actor,
            reason=reason,
            valid_from=opt_us(interval[0]),
            valid_to=opt_us(interval[1]),
            expires_at=expires,
            deleted=False,
            embedding=self._dialect.encode_vector(vec),
        )
        self._dialect.live_put(cur, ns, key, rowid, expires, vec)
        self._audit(
            cur,
            namespace=ns,
            key=key,
            op=Op.PUT,
            actor=actor,
            at=committed,
            old_version=current or None,
            new_version=current + 1,
            policy=label,
            reason=reason,
        )
        record = Record(
            namespace=ns,
            key=key,
            version=current + 1,
            text=write.text,
            metadata=write.metadata,
            committed_at=from_us(committed),
            actor=actor,
            reason=reason,
            valid_from=interval[0],
            valid_to=interval[1],
            expires_at=None if expires is None else from_us(expires),
        )
        return rowid, record, vec

    @staticmethod
    def _change(rowid: int, record: Record, vec: np.ndarray) -> RowChange:
        expires = None if record.expires_at is None else to_us(record.expires_at)
        return RowChange(rowid, record.namespace, record.key, expires, vec)

    def _free_key(self, cur: Any, ns: str, key: str, now: int) -> tuple[str, tuple[int, Record, bool] | None]:
        """The first ``key#n`` (n = 2, 3, ...) with no live version, and its latest version."""
        n = 2
        while True:
            candidate = check_key(f"{key}#{n}")
            latest = latest_record(cur, self._dialect, ns, candidate)
            if not is_live(latest, now):
                return candidate, latest
            n += 1

    def get(
        self, namespace: str, key: str, *, as_of: datetime | None = None, valid_at: datetime | None = None
    ) -> Record:
        ns, key = check_namespace(namespace), check_key(key)
        t, w = check_time(as_of, "as_of"), check_time(valid_at, "valid_at")
        with self._txn(write=False) as cur:
            sql, params = visible_records_sql(ns, key=key, as_of=opt_us(t), valid_at=opt_us(w), now=self._now())
            row = self._exec(cur, sql, params).fetchone()
        if row is None:
            when = "" if t is None else f" as of {t.isoformat()}"
            raise NotFound(f"no visible version of key {key!r} in namespace {ns!r}{when}")
        return record_from_row(self._dialect, row)

    def history(self, namespace: str, key: str) -> list[Record]:
        ns, key = check_namespace(namespace), check_key(key)
        with self._txn(write=False) as cur:
            rows = self._exec(
                cur,
                f"SELECT {RECORD_COLS} FROM records WHERE namespace = ? AND key = ? AND compacted = 0 ORDER BY version",
                [ns, key],
            ).fetchall()
        return [record_from_row(self._dialect, row) for row in rows]

    def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        actor: str = "memfusion",
        reason: str | None = None,
    ) -> Record:
        ns, key = check_namespace(namespace), check_key(key)
        expected, actor, reason = check_expected_version(expected_version), check_actor(actor), check_reason(reason)
        with self._lock:
            with self._txn(write=True) as cur:
                now = self._now()
                latest = latest_record(cur, self._dialect, ns, key)
                current = 0 if latest is None else latest[1].version
                if expected is not None and current != expected:
                    raise VersionConflict(
                        f"{ns}/{key} is at version {current}, not {expected}: re-read it and retry", current
                    )
                if latest is None or not is_live(latest, now):
                    raise NotFound(f"key {key!r} in namespace {ns!r} has no live version to delete")
                committed = max(now, to_us(latest[1].committed_at) + 1)
                rowid = append_record(
                    cur,
                    self._dialect,
                    namespace=ns,
                    key=key,
                    version=current + 1,
                    text="",
                    metadata={},
                    committed_at=committed,
                    actor=actor,
                    reason=reason,
                    valid_from=None,
                    valid_to=None,
                    expires_at=None,
                    deleted=True,
                    embedding=None,
                )
                self._dialect.live_remove(cur, ns, key)
                self._audit(
                    cur,
                    namespace=ns,
                    key=key,
                    op=Op.DELETE,
                    actor=actor,
                    at=committed,
                    old_version=current,
                    new_version=current + 1,
                    reason=reason,
                )
            self._applied([RowChange(rowid, ns, key, None, None)])
        return replace(
            latest[1],
            version=current + 1,
            text="",
            metadata={},
            committed_at=from_us(committed),
            actor=actor,
            reason=reason,
            valid_from=None,
            valid_to=None,
            expires_at=None,
            deleted=True,
        )

    def search(
        self,
        namespace: str,
        query: str | None,
        k: int = 5,
        *,
        filter: dict[str, JSON] | None = None,
        as_of: datetime | None = None,
        valid_at: datetime | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
    ) -> list[Hit]:
        ns, k, conditions = check_namespace(namespace), check_k(k), check_filter(filter)
        t, w = check_time(as_of, "as_of"), check_time(valid_at, "valid_at")
        if vector is not None:
            q = check_vector(vector, self.embedder.dim)
        elif query is None:
            raise InvalidInput("search needs a query text or a vector=")
        else:
            q = self._embed(check_text(query))
        if t is None and w is None:
            found = self._search_now(ns, q, k, conditions)
            if found is not None:
                return found
        with self._txn(write=False) as cur:
            now = self._now()
            self._sync(cur)
            candidates = self._visible_ids(cur, ns, opt_us(t), opt_us(w), now, conditions)
            if not len(candidates):
                return []
            ids, scores = self.index.search(q, k, candidates=candidates)
            return self._hits(cur, ids, scores)

    def _search_now(self, ns: str, q: np.ndarray, k: int, conditions: dict[str, JSON]) -> list[Hit] | None:
        """A search of the current facts through the live view; None if the view cannot serve it."""
        with self._txn(write=False) as cur:
            now = self._now()
            self._sync(cur)
            if not self._live.expire(ns, now):
                return None
            index = self._live.index(ns)
            if index is None:  # the namespace has never held a live record
                return []
            candidates = self._filtered_live(cur, ns, conditions, now) if conditions else None
            if candidates is not None and not len(candidates):
                return []
            ids, scores = index.search(q, k, candidates=candidates)
            return self._hits(cur, ids, scores)

    def _filtered_live(self, cur: Any, ns: str, conditions: dict[str, JSON], now: int) -> np.ndarray:
        """Ids of the rows of ``ns`` matching a filter, cached until the namespace's live rows change.

        A cached set may still hold rows that expired since: the live index no longer holds them,
        so the search ignores them; every other change bumps the version and drops the entry.
        """
        slot = (ns, dump_json(conditions))
        version = self._live.version(ns)
        hit = self._filter_cache.get(slot)
        if hit is not None and hit[0] == version:
            self._filter_cache.move_to_end(slot)
            return hit[1]
        ids = self._visible_ids(cur, ns, None, None, now, conditions)
        self._filter_cache[slot] = (version, ids)
        if len(self._filter_cache) > FILTER_CACHE_SIZE:
            self._filter_cache.popitem(last=False)
        return ids

    def _visible_ids(
        self, cur: Any, ns: str, as_of: int | None, valid_at: int | None, now: int, conditions: dict[str, JSON]
    ) -> np.ndarray:
        """Row ids of the visible versions of ``ns`` whose metadata matches ``conditions``."""
        sql, params = visible_records_sql(ns, key=None, as_of=as_of, valid_at=valid_at, now=now, cols="id")
        for name, value in conditions.items():
            clause, more = self._dialect.filter_clause("r.metadata", name, value)
            sql, params = f"{sql} AND {clause}", [*params, *more]
        return np.array([r[0] for r in self._exec(cur, sql, params).fetchall()], dtype=np.int64)

    def _hits(self, cur: Any, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        if not len(ids):
            return []
        marks = ", ".join("?" * len(ids))
        rows = self._exec(cur, f"SELECT {RECORD_COLS} FROM records WHERE id IN ({marks})", ids.tolist())
        by_id = {int(row[0]): record_from_row(self._dialect, row) for row in rows.fetchall()}
        return [Hit(by_id[int(i)], float(s)) for i, s in zip(ids, scores, strict=True) if int(i) in by_id]
