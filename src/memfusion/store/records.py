"""What the store keeps and returns: records, hits, edges, audit entries, consistency reports.

All times are timezone-aware UTC ``datetime`` objects. Metadata values are JSON
(str, int, float, bool, None, lists and dicts of those).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

JSON = Any


@dataclass(frozen=True)
class Record:
    """One version of one key in one namespace.

    ``version`` starts at 1 and grows by exactly 1 with every put or delete of the key: a
    version number, once returned, always names the same content. ``committed_at`` is when
    the store learnt it (strictly increasing along a key's versions); ``valid_from`` /
    ``valid_to`` are when the fact holds in the world (None: unbounded), independent of
    ``committed_at`` (bi-temporal). ``deleted`` marks a tombstone (its text is empty).
    ``expires_at`` comes from ``ttl``; an expired version is invisible to reads and search
    but stays in ``history`` until ``compact``.
    """

    namespace: str
    key: str
    version: int
    text: str
    metadata: dict[str, JSON]
    committed_at: datetime
    actor: str
    reason: str | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    expires_at: datetime | None = None
    deleted: bool = False

    def valid_at(self, t: datetime) -> bool:
        """True if the fact holds at world time ``t`` (``valid_from <= t < valid_to``)."""
        return (self.valid_from is None or self.valid_from <= t) and (self.valid_to is None or t < self.valid_to)


@dataclass(frozen=True)
class Hit:
    """A search result: the record version and its cosine similarity to the query."""

    record: Record
    score: float


@dataclass(frozen=True)
class Edge:
    """One version of a directed, typed edge ``src -[relation]-> dst`` in a namespace.

    Versioned like records (per ``(src, relation, dst)``); ``deleted`` marks an unlink.
    """

    namespace: str
    src: str
    relation: str
    dst: str
    version: int
    committed_at: datetime
    actor: str
    metadata: dict[str, JSON] = field(default_factory=dict)
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    deleted: bool = False


class Op(enum.Enum):
    """What an audit entry records."""

    PUT = "put"
    DELETE = "delete"
    LINK = "link"
    UNLINK = "unlink"
    REJECT = "reject"  # a write refused by the conflict policy (nothing changed)
    COMPACT = "compact"
    REPAIR = "repair"


@dataclass(frozen=True)
class AuditEntry:
    """An append-only log line: every mutation (and every refused write) of the store.

    ``seq`` is strictly increasing over the whole store. ``key`` is the record key, or
    ``"src|relation|dst"`` for edges. ``policy`` names the conflict policy applied to a write
    without ``expected_version`` that found a live record (None otherwise).
    """

    seq: int
    namespace: str
    key: str
    op: Op
    actor: str
    at: datetime
    old_version: int | None
    new_version: int | None
    policy: str | None = None
    reason: str | None = None


class ConflictPolicy(enum.Enum):
    """What a put *without* ``expected_version`` does when the key has a live record.

    - ``LAST_WRITER_WINS``: append a new version (the default);
    - ``REJECT``: raise :class:`~memfusion.errors.VersionConflict` (audited as ``Op.REJECT``);
    - ``KEEP_BOTH``: leave the key as it is and store the incoming write under the first free
      key ``f"{key}#{n}"`` (n = 2, 3, ...), so both facts stay live and searchable.

    A callable ``resolve(current: Record, incoming: Write) -> ConflictPolicy | Write`` may be
    given instead: it returns a policy to apply, or the (possibly merged) write to append.
    """

    LAST_WRITER_WINS = "last_writer_wins"
    REJECT = "reject"
    KEEP_BOTH = "keep_both"


@dataclass(frozen=True)
class Write:
    """An incoming write, as a conflict callback sees (and may rewrite) it."""

    text: str
    metadata: dict[str, JSON]


Resolver = Callable[[Record, Write], "ConflictPolicy | Write"]


@dataclass(frozen=True)
class PutItem:
    """One write of :meth:`Store.put_many`: the arguments of :meth:`Store.put` for one key."""

    key: str
    text: str
    metadata: dict[str, JSON] | None = None
    expected_version: int | None = None
    ttl: float | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    vector: Any = None


@dataclass
class ConsistencyReport:
    """What :meth:`Store.check` found. The records are the truth; the index is derived.

    - ``missing``: live versions (row ids) with no vector in the index;
    - ``stale``: index vectors that differ from the stored embedding of their row;
    - ``orphans``: index ids with no record row;
    - ``broken_chains``: ``(namespace, key)`` whose versions are not exactly 1..n with
      strictly increasing ``committed_at``;
    - ``live_mismatch``: row ids on which the live view (the index a search "now" uses) and
      the records disagree: held but not visible now, or visible now but not held.
    """

    records: int = 0
    indexed: int = 0
    missing: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    broken_chains: list[tuple[str, str]] = field(default_factory=list)
    live_mismatch: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.orphans or self.broken_chains or self.live_mismatch)
