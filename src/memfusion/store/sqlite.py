"""The embedded default backend: one SQLite file in WAL mode.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (``sqlite:///:memory:`` for
a private in-memory store). Durability and concurrency:

- ``journal_mode=WAL``: readers never block the writer nor each other;
- ``synchronous=FULL``: a write is on disk when ``put`` returns (acknowledged means durable);
- every write transaction is ``BEGIN IMMEDIATE``: it takes the file's write lock before
  reading the latest version, so writers in any number of processes are serialised; a
  writer waits up to ``busy_timeout`` seconds for the lock;
- one connection per store object, guarded by a lock (the object is thread-safe).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from memfusion.errors import InvalidInput, StoreUnavailable
from memfusion.store import embed as embed_module
from memfusion.store.dialect import Dialect
from memfusion.store.embed import Embedder, HashingEmbedder
from memfusion.store.index import VectorIndex
from memfusion.store.sql import SQLStore

DEFAULT_BUSY_TIMEOUT_S = 30.0


def default_embedder() -> Embedder:
    """``embed.default_embedder()`` (MiniLM) when available, else ``HashingEmbedder()``."""
    factory: Callable[[], Embedder] | None = getattr(embed_module, "default_embedder", None)
    return factory() if factory is not None else HashingEmbedder()


class SQLiteDialect(Dialect):
    """SQLite is the base dialect's flavour: ``?`` placeholders, ``BEGIN IMMEDIATE``, JSON1."""


def sqlite_path(url: str) -> str:
    """The file path a ``sqlite:///...`` URL names (``:memory:`` kept as is)."""
    parts = urlsplit(url)
    rest = url.split("://", 1)[1] if "://" in url else ""
    if parts.scheme.split("+")[0] != "sqlite" or not rest.startswith("/") or len(rest) < 2:
        raise InvalidInput(
            f"not a SQLite store URL: {url!r}; use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if parts.query or parts.fragment:
        raise InvalidInput(f"SQLite store URLs take no ?query or #fragment: {url!r}; pass options as arguments")
    path = rest[1:]
    if path != ":memory:" and not Path(path).parent.is_dir():
        raise InvalidInput(
            f"directory {str(Path(path).parent)!r} for the store {url!r} does not exist: create it first"
        )
    return path


class SQLiteStore(SQLStore):
    """:class:`~memfusion.store.base.Store` in one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        embedder: Embedder | None = None,
        index: VectorIndex | None = None,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float) or not busy_timeout > 0:
            raise InvalidInput(f"busy_timeout must be a positive number of seconds, got {busy_timeout!r}")
        self.path, self.busy_timeout = path, float(busy_timeout)
        self._data_version: int | None = None
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise InvalidInput(f"cannot open the SQLite store at {path!r}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if path != ":memory:" and str(mode).lower() != "wal":
                raise InvalidInput(f"cannot put {path!r} in WAL mode (got {mode!r}); is it on a network filesystem?")
            conn.execute("PRAGMA synchronous = FULL")
            super().__init__(conn, SQLiteDialect(), embedder=embedder or default_embedder(), index=index, clock=clock)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise InvalidInput(f"{path!r} is not a usable memfusion SQLite store: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    def _sync(self, cur: Any) -> None:
        """Skip the catch-up when no other connection has committed since the last one.

        ``PRAGMA data_version`` changes exactly when another connection commits to the file
        (this connection's own writes are applied as they commit); it is read before the rows,
        so a commit racing with the catch-up only causes one more catch-up later.
        """
        version = int(cur.execute("PRAGMA data_version").fetchone()[0])
        if version == self._data_version and self._generation is not None:
            return
        super()._sync(cur)
        self._data_version = version

    @contextmanager
    def _txn(self, *, write: bool) -> Iterator[Any]:
        """:meth:`SQLBase._txn`, with a lock held too long by another writer as StoreUnavailable."""
        try:
            with super()._txn(write=write) as cur:
                yield cur
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            raise StoreUnavailable(
                f"the SQLite store {self.path!r} stayed locked by another process for more than "
                f"busy_timeout={self.busy_timeout:g}s; nothing was written: retry, or open it with a larger "
                f"busy_timeout ({exc})"
            ) from exc

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """Open ``sqlite:///path.db``; options: ``embedder``, ``index``, ``clock``, ``busy_timeout``."""
        allowed = {"embedder", "index", "clock", "busy_timeout"}
        unknown = set(options) - allowed
        if unknown:
            raise InvalidInput(f"unknown option(s) {sorted(unknown)} for a SQLite store; allowed: {sorted(allowed)}")
        return cls(sqlite_path(url), **options)
