"""The SQL dialect layer: everything that differs between SQL backends, in one small class.

:class:`~memfusion.store.sql.SQLStore` writes every query with ``?`` placeholders and asks the
dialect for the rest: the placeholder style, how to take the write lock, the DDL types, how
vectors and times are encoded, and how a metadata filter becomes SQL. A new backend (e.g.
PostgreSQL) is a subclass overriding a handful of attributes and methods.

Encodings (shared by every dialect unless overridden):

- times are integer microseconds since the Unix epoch, UTC (exact for ``datetime``);
- metadata is JSON text written with ``sort_keys=True`` and compact separators;
- an embedding is the raw little-endian float32 bytes of the L2-normalised vector.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from memfusion.store.records import JSON

SCHEMA_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(t: datetime) -> int:
    """A timezone-aware datetime -> integer microseconds since the epoch (exact)."""
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """Integer microseconds since the epoch -> a UTC datetime (inverse of :func:`to_us`)."""
    return _EPOCH + timedelta(microseconds=int(us))


def opt_us(t: datetime | None) -> int | None:
    return None if t is None else to_us(t)


def opt_dt(us: int | None) -> datetime | None:
    return None if us is None else from_us(us)


def dump_json(value: JSON) -> str:
    """Canonical JSON text (sorted keys, compact): equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


class Dialect:
    """SQLite-flavoured defaults; subclasses override what their database does differently.

    Invariant: every statement the store runs passes through :meth:`sql` exactly once, and
    every write transaction starts with :meth:`begin_write`, which must give the caller an
    exclusive right to append versions until it commits or rolls back (so that reading the
    latest version and appending ``latest + 1`` is atomic across processes).
    """

    name = "sqlite"
    #: DB-API paramstyle of the driver: "qmark" (``?``) or "format" (``%s``).
    paramstyle = "qmark"
    id_type = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob_type = "BLOB"
    json_type = "TEXT"

    def sql(self, statement: str) -> str:
        """Rewrite ``?`` placeholders into the driver's style."""
        return statement.replace("?", "%s") if self.paramstyle == "format" else statement

    def begin_write(self, cursor: Any) -> None:
        """Start a transaction holding the database's write lock (SQLite: ``BEGIN IMMEDIATE``).

        The lock must serialise ALL writers of the database, not only those of one key: the
        in-memory index catches up on other processes' rows by row id, which is sound only if
        row ids become visible in increasing order (PostgreSQL: a transaction-scoped global
        advisory lock, ``SELECT pg_advisory_xact_lock(<constant>)``, or a pgvector search that
        needs no in-memory index).
        """
        cursor.execute("BEGIN IMMEDIATE")

    def begin_read(self, cursor: Any) -> None:
        """Start a read transaction (one consistent snapshot for several statements)."""
        cursor.execute("BEGIN")

    def commit(self, cursor: Any) -> None:
        cursor.execute("COMMIT")

    def rollback(self, cursor: Any) -> None:
        cursor.execute("ROLLBACK")

    def encode_vector(self, vector: np.ndarray) -> Any:
        return np.asarray(vector, dtype="<f4").tobytes()

    def decode_vector(self, value: Any) -> np.ndarray:
        return np.frombuffer(bytes(value), dtype="<f4").astype(np.float32)

    def encode_json(self, value: JSON) -> Any:
        return dump_json(value)

    def decode_json(self, value: Any) -> JSON:
        if value == "{}":  # most records carry no metadata
            return {}
        return json.loads(value) if isinstance(value, str | bytes) else value

    def ddl(self) -> list[str]:
        """CREATE statements (idempotent) for the four tables and their indexes."""
        i, b, j = self.id_type, self.blob_type, self.json_type
        return [
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
            f"""CREATE TABLE IF NOT EXISTS records (
                id {i}, namespace TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
                text TEXT NOT NULL, metadata {j} NOT NULL, committed_at BIGINT NOT NULL,
                actor TEXT NOT NULL, reason TEXT, valid_from BIGINT, valid_to BIGINT, expires_at BIGINT,
                deleted INTEGER NOT NULL DEFAULT 0, compacted INTEGER NOT NULL DEFAULT 0, embedding {b},
                UNIQUE (namespace, key, version))""",
            f"""CREATE TABLE IF NOT EXISTS edges (
                id {i}, namespace TEXT NOT NULL, src TEXT NOT NULL, relation TEXT NOT NULL,
                dst TEXT NOT NULL, version INTEGER NOT NULL, metadata {j} NOT NULL,
                committed_at BIGINT NOT NULL, actor TEXT NOT NULL, valid_from BIGINT, valid_to BIGINT,
                deleted INTEGER NOT NULL DEFAULT 0, UNIQUE (namespace, src, relation, dst, version))""",
            f"""CREATE TABLE IF NOT EXISTS audit (
                seq {i}, namespace TEXT NOT NULL, key TEXT NOT NULL, op TEXT NOT NULL,
                actor TEXT NOT NULL, at BIGINT NOT NULL, old_version INTEGER, new_version INTEGER,
                policy TEXT, reason TEXT)""",
            "CREATE INDEX IF NOT EXISTS edges_dst ON edges (namespace, dst, relation)",
            "CREATE INDEX IF NOT EXISTS audit_ns ON audit (namespace, seq)",
        ]

    # -- the live-vector table (databases with vector search: PostgreSQL + pgvector) -----------
    #: True if the database searches the live rows itself (see ``memfusion.store.pgvector``);
    #: False: the store keeps them in an in-memory index (``memfusion.store.live``).
    vector_search = False

    def live_put(
        self, cursor: Any, namespace: str, key: str, rowid: int, expires_at: int | None, vector: np.ndarray
    ) -> None:
        """Row ``rowid`` is now the live version of ``key`` (called in the write transaction)."""

    def live_remove(self, cursor: Any, namespace: str, key: str) -> None:
        """``key`` has no live version any more (a tombstone was appended)."""

    def live_forget(self, cursor: Any, rowids: list[int]) -> None:
        """Rows erased in place (compaction) must never be served again."""

    def filter_clause(self, column: str, key: str, value: JSON) -> tuple[str, list[Any]]:
        """SQL matching rows whose metadata ``key`` equals ``value`` (type-exact, bound params).

        ``key`` has been validated by ``check_filter`` and is passed only inside a bound JSON
        path, never spliced into the SQL. Equality is JSON equality: ``True`` does not match
        ``1``, ``1`` matches ``1.0``, ``None`` matches an explicit ``null`` (not a missing key),
        lists/objects compare by canonical JSON; ``{"$in": [...]}`` matches any listed value.
        """
        if isinstance(value, dict) and set(value) == {"$in"}:
            parts = [self.equals_clause(column, key, option) for option in value["$in"]]
            if not parts:
                return "0 = 1", []
            return "(" + " OR ".join(p for p, _ in parts) + ")", [x for _, ps in parts for x in ps]
        return self.equals_clause(column, key, value)

    def equals_clause(self, column: str, key: str, value: JSON) -> tuple[str, list[Any]]:
        """SQL for ``metadata[key] == value`` (see :meth:`filter_clause`)."""
        path = '$."' + key + '"'
        typ = f"json_type({column}, ?)"
        val = f"json_extract({column}, ?)"
        if value is None:
            return f"{typ} = 'null'", [path]
        if isinstance(value, bool):
            return f"{typ} = ?", [path, "true" if value else "false"]
        if isinstance(value, int | float):
            return f"({typ} IN ('integer', 'real') AND {val} = ?)", [path, path, value]
        if isinstance(value, str):
            return f"({typ} = 'text' AND {val} = ?)", [path, path, value]
        return f"({typ} IN ('array', 'object') AND {val} = json(?))", [path, path, dump_json(value)]

    def insert(self, cursor: Any, statement: str, params: list[Any]) -> int:
        """Run an INSERT and return the new row's id (PostgreSQL: append ``RETURNING id``)."""
        cursor.execute(self.sql(statement), params)
        rowid: int = cursor.lastrowid
        return rowid
