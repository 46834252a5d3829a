"""What only the SQLite backend promises: URL forms, pragmas, and chain checks on a raw file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from memfusion.errors import InvalidInput, StoreUnavailable
from memfusion.store import open_store
from memfusion.store.embed import HashingEmbedder
from memfusion.store.sqlite import SQLiteStore
from tests.store.conftest import DIM, FakeClock


def test_relative_absolute_and_memory_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel.db", embedder=HashingEmbedder(DIM)) as rel:
        rel.put("ns", "k", "relative")
    assert (tmp_path / "rel.db").exists()
    with open_store(f"sqlite:///{tmp_path}/abs.db", embedder=HashingEmbedder(DIM)) as absolute:
        assert str(tmp_path).startswith("/")  # so the URL above had four slashes
        absolute.put("ns", "k", "absolute")
    with open_store("sqlite:///:memory:", embedder=HashingEmbedder(DIM)) as mem:
        mem.put("ns", "k", "in memory")
        assert mem.get("ns", "k").text == "in memory"


def test_wal_full_sync_and_busy_timeout(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "m.db"), embedder=HashingEmbedder(DIM), busy_timeout=7)
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 7000
    store.close()


def test_default_embedder_is_used_when_none_is_given(tmp_path: Path) -> None:
    from memfusion.store.sqlite import default_embedder

    expected = default_embedder()
    with open_store(f"sqlite:///{tmp_path}/d.db") as store:
        assert isinstance(store, SQLiteStore)
        assert (store.embedder.name, store.embedder.dim) == (expected.name, expected.dim)


def test_check_reports_broken_version_chains(tmp_path: Path) -> None:
    path = tmp_path / "chains.db"
    store = open_store(f"sqlite:///{path}", embedder=HashingEmbedder(DIM), clock=FakeClock())
    for text in ("a", "b", "c"):
        store.put("ns", "gap", text)
        store.put("ns", "clock", text)
        store.put("ns", "fine", text)
    store.link("ns", "x", "r", "y")
    store.link("ns", "x", "r", "y")
    assert store.check().ok
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE records SET version = 5 WHERE namespace = 'ns' AND key = 'gap' AND version = 3")
        raw.execute("UPDATE records SET committed_at = 0 WHERE namespace = 'ns' AND key = 'clock' AND version = 2")
        raw.execute("UPDATE edges SET version = 7 WHERE version = 2")
    raw.close()
    report = store.check()
    assert report.broken_chains == [("ns", "clock"), ("ns", "gap"), ("ns", "x|r|y")]
    assert (report.missing, report.stale, report.orphans) == ([], [], [])
    assert store.repair().broken_chains == report.broken_chains  # records are the truth: left as found
    store.close()


def test_an_uncommitted_transaction_leaves_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "tx.db"
    store = open_store(f"sqlite:///{path}", embedder=HashingEmbedder(DIM))
    store.put("ns", "k", "committed")

    def explode(current: object, incoming: object) -> object:
        raise RuntimeError("callback failed mid-transaction")

    with pytest.raises(RuntimeError):
        store.put("ns", "k", "never", on_conflict=explode)  # type: ignore[arg-type]
    assert [r.text for r in store.history("ns", "k")] == ["committed"]
    assert len(store.audit("ns")) == 1
    store.put("ns", "k", "the connection still works")
    assert store.get("ns", "k").version == 2
    store.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(InvalidInput, match="not a usable memfusion SQLite store"):
        open_store(f"sqlite:///{path}", embedder=HashingEmbedder(DIM))
    assert path.read_bytes() == b"this is not an SQLite database" * 100


def test_a_lock_held_past_busy_timeout_is_store_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    """mem0's users meet a raw "database is locked"; here it is a StoreUnavailable that says what to do."""
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    store = open_store(url, embedder=HashingEmbedder(16), busy_timeout=0.2)
    store.put("ns", "k", "first")
    holder = sqlite3.connect(str(tmp_path / "locked.db"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(StoreUnavailable, match=r"busy_timeout=0\.2s; nothing was written"):
            store.put("ns", "k", "second")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [r.text for r in store.history("ns", "k")] == ["first"]
    assert store.put("ns", "k", "second").version == 2  # the lock is gone: writes go through again
