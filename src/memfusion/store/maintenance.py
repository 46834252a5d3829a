"""Audit log reads, check / repair of the derived index, and compaction of expired versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np

from memfusion.store import consistency
from memfusion.store.base import (
    check_namespace,
    check_time,
)
from memfusion.store.dialect import from_us, to_us
from memfusion.store.options import (
    check_limit,
)
from memfusion.store.records import (
    AuditEntry,
    ConsistencyReport,
    Op,
)
from memfusion.store.sqlbase import SQLBase
from memfusion.store.versions import AUDIT_COLS, visible_records_sql

#: The audit namespace of store-wide operations (``repair``); not a valid tenant namespace.
STORE_WIDE = "*"


class MaintenanceMixin(SQLBase):
    """``audit``, ``check``, ``repair`` and ``compact`` of :class:`~memfusion.store.sql.SQLStore`."""

    def audit(self, namespace: str, *, since: datetime | None = None, limit: int = 1000) -> list[AuditEntry]:
        ns = namespace if namespace == STORE_WIDE else check_namespace(namespace)
        t, limit = check_time(since, "since"), check_limit(limit)
        sql, params = f"SELECT {AUDIT_COLS} FROM audit WHERE namespace = ?", list[Any]([ns])
        if t is not None:
            sql, params = sql + " AND at > ?", [*params, to_us(t)]
        with self._txn(write=False) as cur:
            rows = self._exec(cur, sql + " ORDER BY seq LIMIT ?", [*params, limit]).fetchall()
        return [
            AuditEntry(
                seq=int(r[0]),
                namespace=r[1],
                key=r[2],
                op=Op(r[3]),
                actor=r[4],
                at=from_us(r[5]),
                old_version=r[6],
                new_version=r[7],
                policy=r[8],
                reason=r[9],
            )
            for r in rows
        ]

    def check(self) -> ConsistencyReport:
        with self._txn(write=False) as cur:
            self._sync(cur)
            report = consistency.check(cur, self._dialect, self.index)
            now = self._now()
            namespaces = [r[0] for r in self._exec(cur, "SELECT DISTINCT namespace FROM records").fetchall()]
            for ns in sorted(set(namespaces) | set(self._live.namespaces())):
                sql, params = visible_records_sql(ns, key=None, as_of=None, valid_at=None, now=now, cols="id")
                visible = {int(r[0]) for r in self._exec(cur, sql, params).fetchall()}
                report.live_mismatch += self._live_mismatch(cur, ns, visible, now)
            return report

    def _live_mismatch(self, cur: Any, ns: str, visible: set[int], now: int) -> list[int]:
        """Row ids where the live rows held for ``ns`` differ from ``visible`` (sorted)."""
        if not self._live.expire(ns, now):
            return []  # the clock went back: searches use SQL, the view is not in use
        return sorted(visible ^ set(self._live.live_ids(ns).tolist()))

    def _rebuild_live(self, cur: Any) -> None:
        """Rebuild live rows kept in the database (none here: the in-memory view rebuilds on sync)."""

    def repair(self) -> ConsistencyReport:
        """Rebuild the index from the records (audited under namespace ``"*"``)."""
        with self._lock:
            before = self.check()
            with self._txn(write=False) as cur:
                self._generation = None
                self._sync(cur)
            with self._txn(write=True) as cur:
                self._rebuild_live(cur)
                summary = (
                    f"index rebuilt: {len(before.missing)} missing, {len(before.stale)} stale, "
                    f"{len(before.orphans)} orphan vectors, {len(before.live_mismatch)} live-view mismatches; "
                    f"{len(before.broken_chains)} broken chains left as found"
                )
                self._audit(
                    cur,
                    namespace=STORE_WIDE,
                    key="index",
                    op=Op.REPAIR,
                    actor="memfusion",
                    at=self._now(),
                    old_version=None,
                    new_version=None,
                    reason=summary,
                )
            return self.check()

    def compact(self, namespace: str | None = None) -> int:
        """Erase expired versions (content, metadata, embedding) and hide them from history."""
        ns = None if namespace is None else check_namespace(namespace)
        with self._lock:
            with self._txn(write=True) as cur:
                now = self._now()
                sql = "SELECT id, namespace, key, version FROM records WHERE compacted = 0 AND expires_at <= ?"
                rows = self._exec(
                    cur, sql + ("" if ns is None else " AND namespace = ?"), [now] if ns is None else [now, ns]
                ).fetchall()
                for rowid, row_ns, key, version in rows:
                    self._exec(
                        cur,
                        "UPDATE records SET text = '', metadata = ?, embedding = NULL, compacted = 1 WHERE id = ?",
                        [self._dialect.encode_json({}), rowid],
                    )
                    self._audit(
                        cur,
                        namespace=row_ns,
                        key=key,
                        op=Op.COMPACT,
                        actor="memfusion",
                        at=now,
                        old_version=version,
                        new_version=None,
                    )
                self._dialect.live_forget(cur, [r[0] for r in rows])
                old = int(self._exec(cur, "SELECT value FROM meta WHERE name = 'generation'").fetchone()[0])
                if rows:
                    self._exec(cur, "UPDATE meta SET value = ? WHERE name = 'generation'", [str(old + 1)])
            if rows:
                self.index.remove(np.array([r[0] for r in rows], dtype=np.int64))
                for row_ns in {r[1] for r in rows}:
                    self._live.forget(row_ns, [r[0] for r in rows if r[1] == row_ns])
                self._generation = old + 1 if old == self._generation else None
        return len(rows)
