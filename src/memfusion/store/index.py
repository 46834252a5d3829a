"""Vector indexes over L2-normalised float32 vectors, keyed by int64 ids (cosine = dot product).

The index is derived data: the store's records hold every embedding and can rebuild it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from memfusion.errors import InvalidInput


@runtime_checkable
class VectorIndex(Protocol):
    """Invariant: each id maps to exactly one vector; ``add`` of a present id replaces it.

    ``search(query (d,), k, candidates=None)`` returns ``(ids (m,), scores (m,))`` best first,
    ``m <= k``; with ``candidates`` (an int64 array of ids), only those ids are eligible and the
    top-k is taken among them (never filtered after a truncated top-k).
    """

    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(
        self, query: np.ndarray, k: int, candidates: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def ids(self) -> np.ndarray: ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...

    def __len__(self) -> int: ...


class ExactIndex:
    """Brute-force inner product over a dense matrix (exact; the reference for recall)."""

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"index dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self._ids = np.empty(0, dtype=np.int64)
        self._vecs = np.empty((0, dim), dtype=np.float32)
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._pos)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self.remove(ids[np.isin(ids, self._ids)])
        start = len(self._ids)
        self._ids = np.concatenate([self._ids, ids])
        self._vecs = np.concatenate([self._vecs, vectors])
        for i, id_ in enumerate(ids.tolist()):
            self._pos[id_] = start + i

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return
        keep = ~np.isin(self._ids, ids)
        self._ids, self._vecs = self._ids[keep], self._vecs[keep]
        self._pos = {id_: i for i, id_ in enumerate(self._ids.tolist())}

    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        rows = [self._pos[int(i)] for i in np.asarray(ids).reshape(-1)]
        return self._vecs[rows]

    def search(self, query: np.ndarray, k: int, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if candidates is None:
            ids, vecs = self._ids, self._vecs
        else:
            rows = np.array([self._pos[c] for c in np.asarray(candidates).tolist() if c in self._pos], dtype=np.int64)
            ids, vecs = self._ids[rows], self._vecs[rows]
        if not len(ids):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        scores = vecs @ np.asarray(query, dtype=np.float32)  # (n,)
        k = min(k, len(ids))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return ids[top], scores[top]
