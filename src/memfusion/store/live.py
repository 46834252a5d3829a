"""The live view: per namespace, a vector index of the rows that are the current fact of their key.

A search "now" (no ``as_of``, no ``valid_at``) only ever returns the latest version of a key
that is not a tombstone, not compacted and not expired. The history index holds every version
(for time travel), so searching it for "now" needs the visible row ids from SQL on every query;
this view keeps those rows in an index of their own, so a plain search is one ANN query plus
one primary-key fetch of the k hits.

Invariants:

- ``_last[(ns, key)]`` is the highest row id applied for that key (put or tombstone). Rows may
  be applied in any order and more than once: a row at or below ``_last`` changes nothing,
  because a key's versions get increasing row ids (writers are serialised by the write lock);
- ``_index[ns]`` holds exactly the rows that are the ``_last`` row of their key, carry an
  embedding (not tombstones, not compacted) and were not found expired by :meth:`expire`;
- expiry is applied lazily: ``_expiring[ns]`` is a heap of ``(expires_at, row id, key)``;
  ``expire(ns, now)`` removes every row whose ``expires_at <= now``. ``watermark`` is the
  largest ``now`` applied; a search at an earlier ``now`` (a clock that went back) must not use
  the view (an expired row would be missing), and the store falls back to SQL then.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memfusion.store.index import VectorIndex


@dataclass(frozen=True)
class RowChange:
    """One record row as the view needs it: ``vector`` is None for tombstones and compacted rows."""

    rowid: int
    namespace: str
    key: str
    expires_at: int | None
    vector: np.ndarray | None


class LiveView:
    """The live rows of every namespace in per-namespace vector indexes (see the module docstring)."""

    def __init__(self, make_index: Callable[[], VectorIndex]) -> None:
        self._make_index = make_index
        self._epoch = 0
        self.reset()

    def reset(self) -> None:
        self._epoch += 1  # a version is (epoch, count): never repeats across resets
        self._versions: dict[str, int] = {}  # bumped on every change of a namespace's live rows
        self._last: dict[tuple[str, str], int] = {}
        self._index: dict[str, VectorIndex] = {}
        self._expiring: dict[str, list[tuple[int, int, str]]] = {}
        self.watermark = -(2**63)

    def apply(self, changes: list[RowChange]) -> None:
        """Apply rows (any order, repeats allowed): each becomes its key's live row if newest."""
        adds: dict[str, dict[int, np.ndarray]] = {}
        removes: dict[str, set[int]] = {}
        for ch in changes:
            slot = (ch.namespace, ch.key)
            prev = self._last.get(slot, 0)
            if ch.rowid <= prev:
                continue
            self._last[slot] = ch.rowid
            self._bump(ch.namespace)
            if prev:
                pending = adds.get(ch.namespace)
                if pending is not None and prev in pending:
                    del pending[prev]
                else:
                    removes.setdefault(ch.namespace, set()).add(prev)
            if ch.vector is None:
                continue
            if ch.expires_at is not None:
                if ch.expires_at <= self.watermark:
                    continue  # already expired for every "now" the view has served
                heapq.heappush(self._expiring.setdefault(ch.namespace, []), (ch.expires_at, ch.rowid, ch.key))
            adds.setdefault(ch.namespace, {})[ch.rowid] = ch.vector
        for ns, gone in removes.items():
            if ns in self._index:
                self._index[ns].remove(np.fromiter(gone, dtype=np.int64, count=len(gone)))
        for ns, rows in adds.items():
            if rows:
                index = self._index.get(ns)
                if index is None:
                    index = self._index[ns] = self._make_index()
                index.add(np.fromiter(rows, dtype=np.int64, count=len(rows)), np.stack(list(rows.values())))

    def expire(self, namespace: str, now: int) -> bool:
        """Drop rows of ``namespace`` expired at ``now``; False if ``now`` is before the watermark."""
        if now < self.watermark:
            return False
        self.watermark = now
        heap = self._expiring.get(namespace)
        dead: list[int] = []
        while heap and heap[0][0] <= now:
            _, rowid, key = heapq.heappop(heap)
            if self._last.get((namespace, key)) == rowid:
                dead.append(rowid)
        if dead and namespace in self._index:
            self._index[namespace].remove(np.asarray(dead, dtype=np.int64))
            self._bump(namespace)
        return True

    def forget(self, namespace: str, rowids: list[int]) -> None:
        """Drop rows erased in place (compaction): the view never serves their content again."""
        index = self._index.get(namespace)
        if index is not None and rowids:
            index.remove(np.asarray(rowids, dtype=np.int64))
            self._bump(namespace)

    def _bump(self, namespace: str) -> None:
        self._versions[namespace] = self._versions.get(namespace, 0) + 1

    def version(self, namespace: str) -> tuple[int, int]:
        """Changes whenever the live rows of ``namespace`` change (also across :meth:`reset`)."""
        return self._epoch, self._versions.get(namespace, 0)

    def index(self, namespace: str) -> VectorIndex | None:
        return self._index.get(namespace)

    def live_ids(self, namespace: str) -> np.ndarray:
        """Row ids the view holds live for ``namespace`` (sorted)."""
        index = self._index.get(namespace)
        return np.sort(index.ids()) if index is not None else np.empty(0, dtype=np.int64)

    def namespaces(self) -> list[str]:
        return sorted(self._index)
