"""Every bad input named by the store contract raises InvalidInput and changes nothing.

"Nothing" is checked through the public API: the history of every seeded key, every audit
entry, the edges and the consistency report are equal before and after the bad call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

import memfusion
from memfusion.errors import InvalidInput
from memfusion.store import Store, open_store
from memfusion.store.base import MAX_K, MAX_METADATA_BYTES, MAX_TEXT_BYTES
from memfusion.store.embed import HashingEmbedder
from memfusion.store.index import ExactIndex
from tests.store.conftest import DIM, T0, Opener

SQL = "x'); DROP TABLE records; --"


def seed(store: Store) -> None:
    store.put("ns", "k", "a seeded fact", metadata={"tag": "x"})
    store.put("ns", "k", "a seeded fact, version two")
    store.put("ns", "j", "another fact")
    store.link("ns", "k", "rel", "j")


def snapshot(store: Store) -> tuple[Any, ...]:
    return (
        store.history("ns", "k"),
        store.history("ns", "j"),
        store.audit("ns"),
        store.audit("*"),
        store.neighbors("ns", "k", direction="both"),
        store.check(),
        [(h.record, round(h.score, 6)) for h in store.search("ns", "fact", k=10)],
    )


class NotJSON:
    pass


BAD_CALLS: dict[str, Callable[[Store], object]] = {
    "vector of the wrong dimension": lambda s: s.put("ns", "k", "t", vector=np.ones(DIM + 1)),
    "vector with NaN": lambda s: s.put("ns", "k", "t", vector=[math.nan] + [1.0] * (DIM - 1)),
    "vector with inf": lambda s: s.put("ns", "k", "t", vector=[math.inf] + [1.0] * (DIM - 1)),
    "zero vector": lambda s: s.put("ns", "k", "t", vector=np.zeros(DIM)),
    "empty text": lambda s: s.put("ns", "k", ""),
    "blank text": lambda s: s.put("ns", "k", "  \n"),
    "non-string text": lambda s: s.put("ns", "k", 42),  # type: ignore[arg-type]
    "oversize text": lambda s: s.put("ns", "k", "x" * (MAX_TEXT_BYTES + 1)),
    "oversize multibyte text": lambda s: s.put("ns", "k", "é" * (MAX_TEXT_BYTES // 2 + 1)),
    "oversize metadata": lambda s: s.put("ns", "k", "t", metadata={"big": "x" * MAX_METADATA_BYTES}),
    "non-JSON metadata value": lambda s: s.put("ns", "k", "t", metadata={"o": NotJSON()}),
    "set in metadata": lambda s: s.put("ns", "k", "t", metadata={"o": {1, 2}}),
    "NaN in metadata": lambda s: s.put("ns", "k", "t", metadata={"o": math.nan}),
    "metadata not a dict": lambda s: s.put("ns", "k", "t", metadata=[("a", 1)]),  # type: ignore[arg-type]
    "metadata key carrying SQL": lambda s: s.put("ns", "k", "t", metadata={SQL: 1}),
    "namespace carrying SQL": lambda s: s.put(SQL, "k", "t"),
    "namespace carrying SQL in get": lambda s: s.get(SQL, "k"),
    "namespace carrying SQL in search": lambda s: s.search(SQL, "fact"),
    "namespace carrying SQL in audit": lambda s: s.audit(SQL),
    "empty namespace": lambda s: s.put("", "k", "t"),
    "filter key carrying SQL": lambda s: s.search("ns", "fact", filter={SQL: 1}),
    "filter key with a quote": lambda s: s.search("ns", "fact", filter={'tag"': "x"}),
    "filter with an unknown operator": lambda s: s.search("ns", "fact", filter={"tag": {"$gt": 1}}),
    "filter value not JSON": lambda s: s.search("ns", "fact", filter={"tag": NotJSON()}),
    "filter not a dict": lambda s: s.search("ns", "fact", filter="tag = 'x'"),  # type: ignore[arg-type]
    "empty key": lambda s: s.put("ns", "", "t"),
    "key with a control character": lambda s: s.put("ns", "a\x00b", "t"),
    "k = 0": lambda s: s.search("ns", "fact", k=0),
    "k too large": lambda s: s.search("ns", "fact", k=MAX_K + 1),
    "k a bool": lambda s: s.search("ns", "fact", k=True),
    "empty query": lambda s: s.search("ns", ""),
    "no query and no vector": lambda s: s.search("ns", None),
    "search vector of the wrong dimension": lambda s: s.search("ns", None, vector=np.ones(3)),
    "naive as_of": lambda s: s.get("ns", "k", as_of=datetime(2030, 1, 1)),
    "as_of not a datetime": lambda s: s.get("ns", "k", as_of="yesterday"),  # type: ignore[arg-type]
    "naive valid_from": lambda s: s.put("ns", "k", "t", valid_from=datetime(2030, 1, 1)),
    "valid_from after valid_to": lambda s: s.put("ns", "k", "t", valid_from=T0, valid_to=T0.replace(year=2029)),
    "negative ttl": lambda s: s.put("ns", "k", "t", ttl=-1),
    "NaN ttl": lambda s: s.put("ns", "k", "t", ttl=math.nan),
    "ttl past the datetime range": lambda s: s.put("ns", "k", "t", ttl=1e300),
    "as_of overflowing UTC": lambda s: s.get(
        "ns", "k", as_of=datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    ),
    "negative expected_version": lambda s: s.put("ns", "k", "t", expected_version=-1),
    "expected_version a string": lambda s: s.put("ns", "k", "t", expected_version="2"),  # type: ignore[arg-type]
    "unknown conflict policy": lambda s: s.put("ns", "k", "t", on_conflict="maybe"),  # type: ignore[arg-type]
    "callback returning junk": lambda s: s.put("ns", "k", "t", on_conflict=lambda c, i: "merge"),
    "callback merging to empty text": lambda s: s.put(
        "ns", "k", "t", on_conflict=lambda c, i: memfusion.store.Write("", {})
    ),
    "empty actor": lambda s: s.put("ns", "k", "t", actor=""),
    "bad neighbors direction": lambda s: s.neighbors("ns", "k", direction="sideways"),
    "link with empty relation": lambda s: s.link("ns", "k", "", "j"),
    "link with non-JSON metadata": lambda s: s.link("ns", "k", "rel", "j", metadata={"o": NotJSON()}),
    "audit limit 0": lambda s: s.audit("ns", limit=0),
    "compact a bad namespace": lambda s: s.compact(SQL),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(store: Store, name: str) -> None:
    seed(store)
    before = snapshot(store)
    with pytest.raises(InvalidInput) as err:
        BAD_CALLS[name](store)
    assert str(err.value)  # a message that says what to do
    assert snapshot(store) == before


def test_messages_name_the_problem(store: Store) -> None:
    with pytest.raises(InvalidInput, match=r"shape \(64,\)"):
        store.put("ns", "k", "t", vector=np.ones(3))
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        store.put("ns", "k", "t", vector=[math.nan] * DIM)
    with pytest.raises(InvalidInput, match=f"limit is {MAX_TEXT_BYTES} bytes"):
        store.put("ns", "k", "x" * (MAX_TEXT_BYTES + 1))
    with pytest.raises(InvalidInput, match="namespace"):
        store.put(SQL, "k", "t")


@pytest.mark.parametrize(
    "url", ["mysql://user@host/db", "http://example.com/mem.db", "mem.db", "sqlite://", "sqlite:///", 42]
)
def test_bad_urls(url: Any) -> None:
    with pytest.raises(InvalidInput):
        open_store(url, embedder=HashingEmbedder(DIM))
    with pytest.raises(InvalidInput):
        memfusion.open_store(url, embedder=HashingEmbedder(DIM))


def test_missing_directory_and_unknown_option(tmp_path: Any) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/no/such/dir/mem.db")
    with pytest.raises(InvalidInput, match="unknown option"):
        open_store(f"sqlite:///{tmp_path}/mem.db", embedder=HashingEmbedder(DIM), colour="blue")


def test_reopening_with_another_embedder_is_refused(open_db: Opener) -> None:
    store = open_db()
    seed(store)
    before = snapshot(store)
    store.close()
    with pytest.raises(InvalidInput, match="hashing-64"):
        open_db(embedder=HashingEmbedder(DIM * 2))
    with pytest.raises(InvalidInput, match="index dim"):
        open_db(index=ExactIndex(DIM * 2))
    assert snapshot(open_db()) == before


def test_a_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    with pytest.raises(InvalidInput, match="closed"):
        store.get("ns", "k")
