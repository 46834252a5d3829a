"""check / repair: the vector index against the records, and the version chains.

The records are the truth; the index is derived data. The index must hold exactly one
vector per *indexable* row — a record row with an embedding (not a tombstone, not
compacted), every version included so that ``search(as_of=...)`` can reach old versions —
and that vector must equal the stored embedding. A version chain is sound when a key's
versions are exactly ``1..n`` with strictly increasing ``committed_at`` (records and edges;
an edge's key is reported as ``"src|relation|dst"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from memfusion.store.dialect import Dialect
from memfusion.store.index import VectorIndex
from memfusion.store.live import RowChange
from memfusion.store.records import ConsistencyReport

#: Largest absolute difference between an index vector and its stored embedding that is not
#: "stale" (ANN indexes may store vectors with float rounding).
STALE_TOLERANCE = 1e-5
_BATCH = 4096

_CHAIN_SQL = """
SELECT DISTINCT namespace, k FROM (
  SELECT namespace, {key} AS k, version, committed_at,
         ROW_NUMBER() OVER (PARTITION BY namespace, {part} ORDER BY version) AS rn,
         LAG(committed_at) OVER (PARTITION BY namespace, {part} ORDER BY version) AS prev
  FROM {table}) chained
WHERE version <> rn OR (prev IS NOT NULL AND committed_at <= prev)
ORDER BY namespace, k
"""


def indexable_rows(cursor: Any, dialect: Dialect, after_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(ids (b,), vectors (b, dim))`` of indexable rows with ``id > after_id``, by id."""
    cursor.execute(
        dialect.sql(
            "SELECT id, embedding FROM records WHERE id > ? AND embedding IS NOT NULL AND compacted = 0 ORDER BY id"
        ),
        [after_id],
    )
    while rows := cursor.fetchmany(_BATCH):
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.stack([dialect.decode_vector(r[1]) for r in rows])  # (b, dim)
        yield ids, vecs


def rows_after(cursor: Any, dialect: Dialect, after_id: int = 0) -> Iterator[list[RowChange]]:
    """Batches of every record row with ``id > after_id`` (tombstones and compacted rows too), by id."""
    cursor.execute(
        dialect.sql(
            "SELECT id, namespace, key, expires_at, compacted, embedding FROM records WHERE id > ? ORDER BY id"
        ),
        [after_id],
    )
    while rows := cursor.fetchmany(_BATCH):
        yield [
            RowChange(
                rowid=int(r[0]),
                namespace=r[1],
                key=r[2],
                expires_at=None if r[3] is None else int(r[3]),
                vector=None if r[4] or r[5] is None else dialect.decode_vector(r[5]),
            )
            for r in rows
        ]


def broken_chains(cursor: Any, dialect: Dialect) -> list[tuple[str, str]]:
    """``(namespace, key)`` of every record or edge chain that is not ``1..n`` in commit order."""
    out: list[tuple[str, str]] = []
    cursor.execute(dialect.sql(_CHAIN_SQL.format(key="key", part="key", table="records")))
    out += [(ns, key) for ns, key in cursor.fetchall()]
    edge_key = "src || '|' || relation || '|' || dst"
    cursor.execute(dialect.sql(_CHAIN_SQL.format(key=edge_key, part="src, relation, dst", table="edges")))
    out += [(ns, key) for ns, key in cursor.fetchall()]
    return out


def check(cursor: Any, dialect: Dialect, index: VectorIndex) -> ConsistencyReport:
    """Compare ``index`` with the records read through ``cursor`` (one read transaction).

    ``records`` counts every record row (tombstones and old versions included); ``indexed``
    is ``len(index)``; ids in each list are sorted.
    """
    report = ConsistencyReport(indexed=len(index))
    cursor.execute(dialect.sql("SELECT COUNT(*) FROM records"))
    report.records = int(cursor.fetchone()[0])
    in_index = set(index.ids().tolist())
    seen: set[int] = set()
    for ids, vecs in indexable_rows(cursor, dialect):
        present = np.array([i in in_index for i in ids.tolist()], dtype=bool)
        report.missing += ids[~present].tolist()
        if present.any():
            diff = np.abs(index.vectors(ids[present]) - vecs[present]).max(axis=1)  # (p,)
            report.stale += ids[present][diff > STALE_TOLERANCE].tolist()
        seen.update(ids.tolist())
    report.orphans = sorted(in_index - seen)
    report.broken_chains = broken_chains(cursor, dialect)
    return report
