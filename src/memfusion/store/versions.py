"""Version rows in SQL: which version is visible, and appending one (records, edges, audit).

The one definition of visibility used by ``get``, ``search`` and ``neighbors`` (read time
``T`` = ``as_of`` or now, world time ``W`` = ``valid_at``):

1. the *deciding* version of a key is the highest version committed at or before ``T``
   (every version when ``as_of`` is None) among those that are tombstones or whose
   ``[valid_from, valid_to)`` contains ``W`` (every version when ``valid_at`` is None);
2. the key is visible iff its deciding version is not a tombstone, not compacted and not
   expired at ``T`` (``expires_at > T``). An older version never resurfaces past a later
   tombstone or an expired later version; with ``valid_at``, the latest version *valid at W*
   decides (bi-temporal: "what did we believe at T about the world at W").

Rows are append-only: the only in-place change is ``compact``, which erases the content of
expired versions and marks them ``compacted`` (the row stays, so chains remain 1..n).
"""

from __future__ import annotations

from typing import Any

from memfusion.store.dialect import Dialect, from_us, opt_dt, opt_us, to_us
from memfusion.store.records import JSON, Edge, Op, Record

RECORD_COLS = (
    "id, namespace, key, version, text, metadata, committed_at, actor, reason, "
    "valid_from, valid_to, expires_at, deleted, compacted"
)
EDGE_COLS = "id, namespace, src, relation, dst, version, metadata, committed_at, actor, valid_from, valid_to, deleted"
AUDIT_COLS = "seq, namespace, key, op, actor, at, old_version, new_version, policy, reason"


def record_from_row(dialect: Dialect, row: tuple[Any, ...]) -> Record:
    """A ``RECORD_COLS`` row -> Record (the row id and compacted flag are dropped)."""
    return Record(
        namespace=row[1],
        key=row[2],
        version=int(row[3]),
        text=row[4],
        metadata=dialect.decode_json(row[5]),
        committed_at=from_us(row[6]),
        actor=row[7],
        reason=row[8],
        valid_from=opt_dt(row[9]),
        valid_to=opt_dt(row[10]),
        expires_at=opt_dt(row[11]),
        deleted=bool(row[12]),
    )


def edge_from_row(dialect: Dialect, row: tuple[Any, ...]) -> Edge:
    """An ``EDGE_COLS`` row -> Edge."""
    return Edge(
        namespace=row[1],
        src=row[2],
        relation=row[3],
        dst=row[4],
        version=int(row[5]),
        metadata=dialect.decode_json(row[6]),
        committed_at=from_us(row[7]),
        actor=row[8],
        valid_from=opt_dt(row[9]),
        valid_to=opt_dt(row[10]),
        deleted=bool(row[11]),
    )


def _deciding_conditions(as_of: int | None, valid_at: int | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if as_of is not None:
        where.append("committed_at <= ?")
        params.append(as_of)
    if valid_at is not None:
        where.append(
            "(deleted = 1 OR ((valid_from IS NULL OR valid_from <= ?) AND (valid_to IS NULL OR ? < valid_to)))"
        )
        params += [valid_at, valid_at]
    return where, params


def visible_records_sql(
    namespace: str, *, key: str | None, as_of: int | None, valid_at: int | None, now: int, cols: str = RECORD_COLS
) -> tuple[str, list[Any]]:
    """SELECT of the visible versions (aliased ``r``) of ``namespace`` (one ``key`` if given).

    Times are integer microseconds; ``now`` judges expiry when ``as_of`` is None. Callers may
    append ``AND ...`` conditions on ``r``.
    """
    inner, params = _deciding_conditions(as_of, valid_at)
    inner = ["namespace = ?", *(["key = ?"] if key is not None else []), *inner]
    params = [namespace, *([key] if key is not None else []), *params]
    cols_r = ", ".join("r." + c.strip() for c in cols.split(","))
    sql = (
        f"SELECT {cols_r} FROM records r JOIN (SELECT key AS k, MAX(version) AS v FROM records "
        f"WHERE {' AND '.join(inner)} GROUP BY key) m ON r.key = m.k AND r.version = m.v "
        "WHERE r.namespace = ? AND r.deleted = 0 AND r.compacted = 0 AND (r.expires_at IS NULL OR r.expires_at > ?)"
    )
    return sql, [*params, namespace, now if as_of is None else as_of]


def visible_edges_sql(
    namespace: str, *, node: str, relation: str | None, direction: str, as_of: int | None, valid_at: int | None
) -> tuple[str, list[Any]]:
    """SELECT of the visible edges at ``node`` (``direction`` in out/in/both), ordered."""
    inner, params = _deciding_conditions(as_of, valid_at)
    ends = {"out": "src = ?", "in": "dst = ?", "both": "(src = ? OR dst = ?)"}[direction]
    inner = ["namespace = ?", ends, *(["relation = ?"] if relation is not None else []), *inner]
    params = [
        namespace,
        *([node, node] if direction == "both" else [node]),
        *([relation] if relation is not None else []),
        *params,
    ]
    cols_e = ", ".join("e." + c.strip() for c in EDGE_COLS.split(","))
    sql = (
        f"SELECT {cols_e} FROM edges e JOIN (SELECT src AS s, relation AS rl, dst AS d, MAX(version) AS v "
        f"FROM edges WHERE {' AND '.join(inner)} GROUP BY src, relation, dst) m "
        "ON e.src = m.s AND e.relation = m.rl AND e.dst = m.d AND e.version = m.v "
        "WHERE e.namespace = ? AND e.deleted = 0 ORDER BY e.src, e.relation, e.dst"
    )
    return sql, [*params, namespace]


def latest_record(cursor: Any, dialect: Dialect, namespace: str, key: str) -> tuple[int, Record, bool] | None:
    """``(row id, latest version, compacted)`` of ``key`` (any state), or None if it has none."""
    cursor.execute(
        dialect.sql(f"SELECT {RECORD_COLS} FROM records WHERE namespace = ? AND key = ? ORDER BY version DESC LIMIT 1"),
        [namespace, key],
    )
    row = cursor.fetchone()
    return None if row is None else (int(row[0]), record_from_row(dialect, row), bool(row[13]))


def is_live(latest: tuple[int, Record, bool] | None, now: int) -> bool:
    """True if the latest version is a visible fact at ``now`` (not tombstone/compacted/expired)."""
    if latest is None:
        return False
    _, rec, compacted = latest
    expired = rec.expires_at is not None and to_us(rec.expires_at) <= now
    return not (rec.deleted or compacted or expired)


def append_record(
    cursor: Any,
    dialect: Dialect,
    *,
    namespace: str,
    key: str,
    version: int,
    text: str,
    metadata: dict[str, JSON],
    committed_at: int,
    actor: str,
    reason: str | None,
    valid_from: int | None,
    valid_to: int | None,
    expires_at: int | None,
    deleted: bool,
    embedding: Any,
) -> int:
    """Insert one version row; returns its row id."""
    return dialect.insert(
        cursor,
        "INSERT INTO records (namespace, key, version, text, metadata, committed_at, actor, reason, "
        "valid_from, valid_to, expires_at, deleted, compacted, embedding) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
        [
            namespace,
            key,
            version,
            text,
            dialect.encode_json(metadata),
            committed_at,
            actor,
            reason,
            valid_from,
            valid_to,
            expires_at,
            int(deleted),
            embedding,
        ],
    )


def latest_edge(cursor: Any, dialect: Dialect, namespace: str, src: str, relation: str, dst: str) -> Edge | None:
    cursor.execute(
        dialect.sql(
            f"SELECT {EDGE_COLS} FROM edges WHERE namespace = ? AND src = ? AND relation = ? AND dst = ? "
            "ORDER BY version DESC LIMIT 1"
        ),
        [namespace, src, relation, dst],
    )
    row = cursor.fetchone()
    return None if row is None else edge_from_row(dialect, row)


def append_edge(cursor: Any, dialect: Dialect, edge: Edge, *, committed_at: int) -> None:
    dialect.insert(
        cursor,
        "INSERT INTO edges (namespace, src, relation, dst, version, metadata, committed_at, actor, "
        "valid_from, valid_to, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            edge.namespace,
            edge.src,
            edge.relation,
            edge.dst,
            edge.version,
            dialect.encode_json(edge.metadata),
            committed_at,
            edge.actor,
            opt_us(edge.valid_from),
            opt_us(edge.valid_to),
            int(edge.deleted),
        ],
    )


def append_audit(
    cursor: Any,
    dialect: Dialect,
    *,
    namespace: str,
    key: str,
    op: Op,
    actor: str,
    at: int,
    old_version: int | None,
    new_version: int | None,
    policy: str | None = None,
    reason: str | None = None,
) -> None:
    """Append one audit line (in the caller's transaction)."""
    dialect.insert(
        cursor,
        "INSERT INTO audit (namespace, key, op, actor, at, old_version, new_version, policy, reason) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [namespace, key, op.value, actor, at, old_version, new_version, policy, reason],
    )
