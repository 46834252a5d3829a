"""The plumbing under :class:`~memfusion.store.sql.SQLStore`: connection, transactions, meta, index sync.

Invariants:

- every statement runs on ONE DB-API connection in autocommit mode, inside a transaction
  opened by :meth:`SQLBase._txn` while holding ``self._lock`` (so the object is thread-safe);
  a write transaction starts with ``dialect.begin_write`` (the database's write lock);
- ``meta`` holds the schema version, the embedder (name, dim) and the index *generation*;
  reopening with another embedder raises :class:`~memfusion.errors.InvalidInput`;
- the vector indexes are derived, per process, in memory: the history index ``index`` holds
  one vector per indexable row (a record row with an embedding; every version, so
  ``search(as_of=...)`` reaches old ones) and the live view (:mod:`memfusion.store.live`) the
  current row of each key per namespace. Rows written here are applied after commit; rows
  written by other processes are applied by :meth:`SQLBase._sync` before each search/check
  (row ids grow in commit order because the write lock serialises writers); a generation
  change (a compaction elsewhere) rebuilds both.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import numpy as np

from memfusion.errors import InvalidInput
from memfusion.store import consistency
from memfusion.store import index as index_module
from memfusion.store.base import (
    Store,
    check_vector,
    now_utc,
)
from memfusion.store.dialect import SCHEMA_VERSION, Dialect, to_us
from memfusion.store.embed import Embedder
from memfusion.store.index import ExactIndex, VectorIndex
from memfusion.store.live import LiveView, RowChange
from memfusion.store.versions import (
    append_audit,
)


def default_index(dim: int) -> VectorIndex:
    """``index.make_index(dim)`` when the index module provides it, else :class:`ExactIndex`."""
    factory: Callable[[int], VectorIndex] | None = getattr(index_module, "make_index", None)
    return factory(dim) if factory is not None else ExactIndex(dim)


class SQLBase(Store):
    """Connection, transactions, meta and index sync shared by the SQL store's parts."""

    def __init__(
        self,
        connection: Any,
        dialect: Dialect,
        *,
        embedder: Embedder,
        index: VectorIndex | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not isinstance(embedder, Embedder) or not isinstance(embedder.dim, int):
            raise InvalidInput(f"embedder must have name, dim and embed(texts); got {type(embedder).__name__}")
        self._conn = connection
        self._dialect = dialect
        self._lock = threading.RLock()
        self._closed = False
        self._clock: Callable[[], datetime] = clock or now_utc
        self.embedder = embedder
        self.index: VectorIndex = default_index(embedder.dim) if index is None else index
        if getattr(self.index, "dim", None) != embedder.dim:
            raise InvalidInput(f"index dim {getattr(self.index, 'dim', None)} != embedder dim {embedder.dim}")
        self._live = LiveView(lambda: default_index(embedder.dim))
        self._filter_cache: OrderedDict[tuple[str, str], tuple[tuple[int, int], np.ndarray]] = OrderedDict()
        self._indexed_upto = 0  # every row with id <= this is in the index and the live view
        self._own: set[int] = set()  # ids added by this process above _indexed_upto
        self._generation: int | None = None  # None: rebuild at the next sync
        self._init_meta()
        if not dialect.vector_search:  # with vector search in the database, built on first need
            with self._txn(write=False) as cur:
                self._sync(cur)

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _txn(self, *, write: bool) -> Iterator[Any]:
        """One transaction on the shared connection; commits on success, rolls back on error."""
        with self._lock:
            if self._closed:
                raise InvalidInput("this store is closed; open it again with memfusion.open_store(url)")
            cur = self._conn.cursor()
            try:
                (self._dialect.begin_write if write else self._dialect.begin_read)(cur)
                try:
                    yield cur
                except BaseException:
                    self._dialect.rollback(cur)
                    raise
                self._dialect.commit(cur)
            finally:
                cur.close()

    def _exec(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._dialect.sql(sql), list(params))
        return cur

    def _now(self) -> int:
        t = self._clock()
        if not isinstance(t, datetime) or t.tzinfo is None:
            raise InvalidInput(f"the store's clock must return timezone-aware datetimes, got {t!r}")
        return to_us(t)

    def _embed(self, text: str) -> np.ndarray:
        return check_vector(self.embedder.embed([text])[0], self.embedder.dim)

    def _init_meta(self) -> None:
        want = {"schema_version": str(SCHEMA_VERSION), "embedder": self.embedder.name, "dim": str(self.embedder.dim)}
        with self._txn(write=True) as cur:
            for statement in self._dialect.ddl():
                cur.execute(statement)
            meta = dict(self._exec(cur, "SELECT name, value FROM meta").fetchall())
            if not meta:
                for name, value in [*want.items(), ("generation", "0")]:
                    self._exec(cur, "INSERT INTO meta (name, value) VALUES (?, ?)", [name, value])
                return
        if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
            raise InvalidInput(f"this store has schema {meta['schema_version']}; upgrade memfusion to open it")
        if (meta.get("embedder"), meta.get("dim")) != (want["embedder"], want["dim"]):
            raise InvalidInput(
                f"this store was built with embedder {meta.get('embedder')!r} (dim {meta.get('dim')}), not "
                f"{self.embedder.name!r} (dim {self.embedder.dim}): open it with that embedder, or use a new store"
            )

    def _sync(self, cur: Any) -> None:
        """Bring the history index and the live view up to date with rows committed by any process."""
        generation = int(self._exec(cur, "SELECT value FROM meta WHERE name = 'generation'").fetchone()[0])
        if generation != self._generation:
            self.index.remove(self.index.ids())
            self._live.reset()
            self._indexed_upto, self._own = 0, set()
            self._generation = generation
        for changes in consistency.rows_after(cur, self._dialect, after_id=self._indexed_upto):
            self._index_rows([c for c in changes if c.rowid not in self._own], changes)
            self._indexed_upto = max(self._indexed_upto, changes[-1].rowid)
        self._own = {i for i in self._own if i > self._indexed_upto}

    def _applied(self, changes: list[RowChange]) -> None:
        """After committing ``changes`` here: index their vectors and move the live view."""
        if self._generation is None:  # nothing is in memory yet: the first _sync reads these rows
            return
        self._index_rows(changes, changes)
        for change in sorted(changes, key=lambda c: c.rowid):
            self._note_own_row(change.rowid)

    def _index_rows(self, new: list[RowChange], changes: list[RowChange]) -> None:
        """Add the vectors of ``new`` to the history index; apply ``changes`` to the live view
        (which ignores repeats, so own rows may be applied again)."""
        rows = [(c.rowid, c.vector) for c in new if c.vector is not None]
        if rows:
            ids = np.fromiter((r for r, _ in rows), dtype=np.int64, count=len(rows))
            self.index.add(ids, np.stack([v for _, v in rows]))  # (n, dim)
        if not self._dialect.vector_search:
            self._live.apply(changes)

    def _note_own_row(self, rowid: int) -> None:
        """After committing row ``rowid`` here (and indexing it if it has a vector)."""
        if rowid == self._indexed_upto + 1:  # nobody wrote in between: the prefix stays complete
            self._indexed_upto = rowid
        else:
            self._own.add(rowid)

    def _audit(self, cur: Any, **fields: Any) -> None:
        append_audit(cur, self._dialect, **fields)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
