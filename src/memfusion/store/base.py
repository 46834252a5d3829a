"""The ``Store`` protocol every backend satisfies (one test suite runs on all of them).

Semantics (what a caller may rely on, whatever the backend):

- **Versions.** Every ``put``/``delete`` appends a version (``version = previous + 1``); nothing
  is updated in place. ``history`` returns every version, oldest first. ``get``/``search`` see
  the latest live version of each key: not a tombstone, not expired (at the read time), and,
  with ``valid_at=t``, valid at world time ``t``.
- **Time travel.** ``as_of=t`` makes ``get``/``search``/``neighbors`` see the store exactly as it
  was at commit time ``t``: versions committed after ``t`` are invisible, a version superseded
  or tombstoned at or before ``t`` is invisible, and expiry is judged at ``t``.
- **Compare-and-set.** ``expected_version=n`` writes only if the key's latest version is ``n``
  (0: the key must not exist); otherwise :class:`~memfusion.errors.VersionConflict` carrying
  ``current_version``. A write is atomic: no reader ever sees a torn version, and concurrent
  writers (threads or processes) never lose an acknowledged write.
- **Conflicts** without ``expected_version``: see :class:`~memfusion.store.records.ConflictPolicy`.
- **Audit.** Every mutation, and every write refused by a conflict policy, appends an
  :class:`~memfusion.store.records.AuditEntry`, in the same transaction as the change.
- **Namespaces** isolate tenants: no call in one namespace returns another's data.
- **Search** is cosine similarity between embeddings, with metadata filters applied inside
  the search (a filter never shrinks a top-k that was computed before filtering).
- **Bad input** raises :class:`~memfusion.errors.InvalidInput` and changes nothing.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from memfusion.errors import InvalidInput
from memfusion.store.records import (
    JSON,
    AuditEntry,
    ConflictPolicy,
    ConsistencyReport,
    Edge,
    Hit,
    PutItem,
    Record,
    Resolver,
)

#: Stated limits (bytes, UTF-8): bigger payloads are refused with InvalidInput.
MAX_TEXT_BYTES = 32 * 1024
MAX_METADATA_BYTES = 16 * 1024
MAX_KEY_CHARS = 512
MAX_K = 1000

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_FILTER_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def now_utc() -> datetime:
    return datetime.now(UTC)


def check_namespace(namespace: Any) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise InvalidInput(
            f"namespace {namespace!r} is not allowed: use 1-128 characters from letters, digits and "
            "_ . : @ - (starting with a letter or digit)"
        )
    return namespace


def check_key(key: Any, what: str = "key") -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or _CONTROL.search(key):
        raise InvalidInput(
            f"{what} must be a non-empty string of at most {MAX_KEY_CHARS} characters without control "
            f"characters, got {key!r}"
        )
    return key


def check_text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("text must be a non-empty string (to remove a fact, use delete())")
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise InvalidInput(f"text is {size} bytes; the limit is {MAX_TEXT_BYTES} bytes: split it into several keys")
    return text


def check_metadata(metadata: Any) -> dict[str, JSON]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"metadata must be a JSON object (a dict), got {type(metadata).__name__}")
    try:
        encoded = json.dumps(dict(metadata), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"metadata must be JSON-serialisable without NaN/Inf: {exc}") from exc
    for k in metadata:
        if not isinstance(k, str) or not _FILTER_KEY.match(k):
            raise InvalidInput(f"metadata key {k!r} is not allowed: use [A-Za-z_][A-Za-z0-9_.-]{{0,63}}")
    if len(encoded.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata is over the {MAX_METADATA_BYTES}-byte limit once JSON-encoded")
    result: dict[str, JSON] = json.loads(encoded)
    return result


def check_filter(filter: Any) -> dict[str, JSON]:
    """A search filter: ``{key: value}`` (equality) or ``{key: {"$in": [values]}}``, all ANDed."""
    if filter is None:
        return {}
    if not isinstance(filter, Mapping):
        raise InvalidInput(f"filter must be a dict of metadata key -> value, got {type(filter).__name__}")
    out: dict[str, JSON] = {}
    for k, v in filter.items():
        if not isinstance(k, str) or not _FILTER_KEY.match(k):
            raise InvalidInput(f"filter key {k!r} is not allowed: use [A-Za-z_][A-Za-z0-9_.-]{{0,63}}")
        if isinstance(v, Mapping) and (
            set(v) != {"$in"} or not isinstance(v["$in"], Sequence) or isinstance(v["$in"], str)
        ):
            raise InvalidInput(f"filter on {k!r}: the only operator is {{'$in': [values]}}")
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"filter value for {k!r} must be JSON: {exc}") from exc
        out[k] = v
    return out


def check_vector(vector: Any, dim: int) -> np.ndarray:
    """A user-supplied embedding: ``(dim,)`` finite floats, returned L2-normalised float32."""
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise InvalidInput(f"vector must have shape ({dim},) for this store's embedder, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInput("vector contains NaN or Inf")
    norm = float(np.linalg.norm(arr))
    if norm == 0.0 or not math.isfinite(norm):
        raise InvalidInput("vector must be non-zero (cosine similarity is undefined for a zero vector)")
    return arr / norm


def check_k(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be an integer in [1, {MAX_K}], got {k!r}")
    return k


def check_time(t: Any, name: str) -> datetime | None:
    if t is None:
        return None
    if not isinstance(t, datetime) or t.tzinfo is None:
        raise InvalidInput(f"{name} must be a timezone-aware datetime (e.g. datetime.now(UTC)), got {t!r}")
    try:
        return t.astimezone(UTC)
    except OverflowError:
        raise InvalidInput(f"{name} is out of the datetime range once converted to UTC: {t!r}") from None


class Store(ABC):
    """The persistent, versioned memory store (see the module docstring for the semantics)."""

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **options: Any) -> Store:
        """Open the store a URL names (``open_store`` dispatches here by scheme)."""

    @abstractmethod
    def put(
        self,
        namespace: str,
        key: str,
        text: str,
        *,
        metadata: dict[str, JSON] | None = None,
        expected_version: int | None = None,
        actor: str = "memfusion",
        reason: str | None = None,
        ttl: float | None = None,
        valid_from: datetime | None = None,
        valid_to: datetime | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        on_conflict: ConflictPolicy | Resolver = ConflictPolicy.LAST_WRITER_WINS,
    ) -> Record:
        """Append a version; returns it. ``ttl`` in seconds; ``vector`` overrides the embedder."""

    @abstractmethod
    def put_many(
        self,
        namespace: str,
        items: Iterable[PutItem | Mapping[str, Any]],
        *,
        actor: str = "memfusion",
        reason: str | None = None,
        on_conflict: ConflictPolicy | Resolver = ConflictPolicy.LAST_WRITER_WINS,
    ) -> list[Record]:
        """Several puts in ONE transaction, in order: all are committed or none is.

        Each item is a :class:`PutItem` or a dict of its fields (``key``, ``text``, ...). Texts
        without a ``vector`` are embedded in one batch. A conflict (a stale ``expected_version``,
        or a ``reject`` policy meeting a live version) raises and commits nothing.
        """

    @abstractmethod
    def get(
        self, namespace: str, key: str, *, as_of: datetime | None = None, valid_at: datetime | None = None
    ) -> Record:
        """The visible version of ``key``; :class:`~memfusion.errors.NotFound` if none."""

    @abstractmethod
    def history(self, namespace: str, key: str) -> list[Record]:
        """Every version of ``key`` (tombstones and expired versions included), oldest first."""

    @abstractmethod
    def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        actor: str = "memfusion",
        reason: str | None = None,
    ) -> Record:
        """Append a tombstone version; history is kept. NotFound if the key has no live version."""

    @abstractmethod
    def search(
        self,
        namespace: str,
        query: str | None,
        k: int = 5,
        *,
        filter: dict[str, JSON] | None = None,
        as_of: datetime | None = None,
        valid_at: datetime | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
    ) -> list[Hit]:
        """The ``k`` visible records most similar to ``query`` (or ``vector``), best first."""

    @abstractmethod
    def link(
        self,
        namespace: str,
        src: str,
        relation: str,
        dst: str,
        *,
        metadata: dict[str, JSON] | None = None,
        valid_from: datetime | None = None,
        valid_to: datetime | None = None,
        actor: str = "memfusion",
    ) -> Edge:
        """Add (a new version of) the edge ``src -[relation]-> dst``."""

    @abstractmethod
    def unlink(self, namespace: str, src: str, relation: str, dst: str, *, actor: str = "memfusion") -> Edge:
        """Tombstone the edge; NotFound if it is not live."""

    @abstractmethod
    def neighbors(
        self,
        namespace: str,
        node: str,
        *,
        relation: str | None = None,
        direction: str = "out",
        as_of: datetime | None = None,
        valid_at: datetime | None = None,
    ) -> list[Edge]:
        """Live edges from (``"out"``), to (``"in"``) or around (``"both"``) ``node``."""

    @abstractmethod
    def audit(self, namespace: str, *, since: datetime | None = None, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries of ``namespace`` (committed after ``since``), oldest first."""

    @abstractmethod
    def check(self) -> ConsistencyReport:
        """Verify index <-> records <-> version chains."""

    @abstractmethod
    def repair(self) -> ConsistencyReport:
        """Rebuild the index from the records; returns the report after the repair."""

    @abstractmethod
    def compact(self, namespace: str | None = None) -> int:
        """Remove expired versions from history (audited); returns how many were removed."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and files; the store is unusable afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
