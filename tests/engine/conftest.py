"""Engine fixtures: the tiny random Llama with the reference tokenizer, a real SQLite store with the
MiniLM embedder (the default: retrieval decisions use real similarities)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import memfusion
from memfusion.bench.runner import LoadedModel, random_model
from memfusion.store.base import Store


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return random_model(seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path: Path = tmp_path_factory.mktemp("engine") / "mem.db"
    opened = memfusion.open_store(f"sqlite:///{path}")
    yield opened
    opened.close()
