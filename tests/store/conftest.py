"""Store fixtures: one entry per backend in BACKENDS; every contract test runs on each.

A backend entry is ``name -> opener(tmp_path, **options) -> Store``; the opener must accept
``embedder`` and ``clock`` options and reopen the same database when called again with the
same ``tmp_path``. (PostgreSQL: add one entry that starts/reuses a loopback server.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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


BACKENDS: dict[str, Callable[..., Store]] = {"sqlite": _sqlite}

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
