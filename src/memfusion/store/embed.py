"""Embedders: text -> L2-normalised float32 vectors.

Every embedder has a ``name`` (stored with the data, so a store refuses to reopen with a
different one) and a fixed ``dim``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from memfusion.errors import InvalidInput

_TOKEN = re.compile(r"[a-z0-9]+")


@runtime_checkable
class Embedder(Protocol):
    """``embed(texts) -> (n, dim)`` float32, each row of unit L2 norm."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class HashingEmbedder:
    """Deterministic bag-of-words hashing (signed feature hashing of lower-cased word unigrams and
    bigrams). No model, no randomness across processes: for tests and as a cheap lexical baseline.
    """

    def __init__(self, dim: int = 256) -> None:
        if not isinstance(dim, int) or dim < 8:
            raise InvalidInput(f"HashingEmbedder dim must be an integer >= 8, got {dim!r}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _features(self, text: str) -> list[str]:
        words = _TOKEN.findall(text.lower())
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feat in self._features(text) or [text]:
                h = int.from_bytes(hashlib.blake2b(feat.encode("utf-8"), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
            norm = float(np.linalg.norm(out[row]))
            if norm == 0.0:  # every feature cancelled out: fall back to one deterministic bucket
                out[row, 0] = 1.0
            else:
                out[row] /= norm
        return out
