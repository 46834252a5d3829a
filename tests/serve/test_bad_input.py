"""Bad input: 422 with a message that names the field and the rule; 413 over the size limit;
never a 500. The store's state is checked unchanged after each refused write."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from memfusion.store import Store

from .conftest import Server, unique

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"text": 42}, "body.text", "valid string"),
        ({"text": "x", "expected_version": "1"}, "body.expected_version", "valid integer"),
        ({"text": "x", "expected_version": 1.5}, "body.expected_version", "valid integer"),
        ({"text": "x", "expected_version": -1}, "body.expected_version", "greater than or equal to 0"),
        ({"text": "x", "ttl": -5}, "body.ttl", "greater than 0"),
        ({"text": "x", "valid_from": "yesterday"}, "body.valid_from", "datetime"),
        ({"text": "x", "valid_from": "2025-01-01T00:00:00"}, "body.valid_from", "timezone"),
        ({"text": "x", "valid_from": "9999-12-31T23:00:00-12:00"}, "body.valid_from", "out of range"),
        ({"text": "x", "metadata": [1, 2]}, "body.metadata", "valid dictionary"),
        ({"text": "x", "on_conflict": "maybe"}, "body.on_conflict", "'last_writer_wins', 'reject' or 'keep_both'"),
        ({"text": "x", "colour": "red"}, "body.colour", "Extra inputs are not permitted"),
        ({}, "body.text", "Field required"),
    ],
)
def test_put_schema_errors_are_precise_422(
    alice: httpx.Client, reference: Store, body: dict[str, Any], field: str, words: str
) -> None:
    key = unique()
    got = alice.put(f"/v1/namespaces/alice/memories/{key}", json=body)
    assert got.status_code == 422, got.text
    detail = got.json()["detail"]
    assert detail.startswith(field + ":") or f"; {field}:" in detail, detail
    assert words in detail, detail
    assert [".".join(map(str, e["loc"])) for e in got.json()["errors"]] == [field]
    assert reference.history("alice", key) == []  # nothing written


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"text": "   "}, "body.text: must not be blank"),
        ({"text": "x" * 40_000}, "body.text: String should have at most 32768 characters"),
        ({"text": "é" * 20_000}, "text is 40000 bytes; the limit is 32768 bytes"),  # the store counts bytes
        ({"text": "x", "metadata": {"bad key": 1}}, "metadata and filter keys must match [A-Za-z_]"),
        ({"text": "x", "metadata": {"a": "x" * 20_000}}, "metadata is over the 16384-byte limit"),
        ({"text": "x", "valid_from": "2025-02-01T00:00:00Z", "valid_to": "2025-01-01T00:00:00Z"}, "must be before"),
    ],
)
def test_rules_of_the_store_are_422_with_a_precise_message(
    alice: httpx.Client, reference: Store, body: dict[str, Any], words: str
) -> None:
    """In the schema when it can say them, else from the store: 422 either way, nothing written."""
    key = unique()
    got = alice.put(f"/v1/namespaces/alice/memories/{key}", json=body)
    assert got.status_code == 422 and words in got.json()["detail"], got.text
    assert reference.history("alice", key) == []


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"query": "x", "k": -1}, "body.k", "greater than or equal to 1"),
        ({"query": "x", "k": 0}, "body.k", "greater than or equal to 1"),
        ({"query": "x", "k": 1001}, "body.k", "less than or equal to 1000"),
        ({"query": "x", "k": "3"}, "body.k", "valid integer"),
        ({"query": "x", "as_of": "not a time"}, "body.as_of", "datetime"),
        ({"query": "x", "as_of": "2025-01-01T00:00:00"}, "body.as_of", "timezone"),
        ({"query": ""}, "body.query", "at least 1 character"),
    ],
)
def test_search_errors(alice: httpx.Client, body: dict[str, Any], field: str, words: str) -> None:
    got = alice.post("/v1/namespaces/alice/search", json=body)
    assert got.status_code == 422, got.text
    assert got.json()["detail"].startswith(field + ":") and words in got.json()["detail"], got.text


def test_search_filter_rules_are_the_stores(alice: httpx.Client) -> None:
    got = alice.post("/v1/namespaces/alice/search", json={"query": "x", "filter": {"a": {"$gt": 1}}})
    assert got.status_code == 422 and "$in is the only operator" in got.json()["detail"], got.text


@pytest.mark.parametrize(
    ("path", "params", "field", "words"),
    [
        ("/v1/namespaces/alice/memories/k", {"as_of": "2025-13-01T00:00:00Z"}, "query.as_of", "datetime"),
        ("/v1/namespaces/alice/memories/k", {"as_of": "2025-01-01T00:00:00"}, "query.as_of", "timezone"),
        ("/v1/namespaces/alice/audit", {"limit": "0"}, "query.limit", "greater than or equal to 1"),
        ("/v1/namespaces/alice/audit", {"limit": "ten"}, "query.limit", "valid integer"),
        ("/v1/namespaces/alice/neighbors/n", {"direction": "up"}, "query.direction", "'out', 'in' or 'both'"),
    ],
)
def test_query_errors(alice: httpx.Client, path: str, params: dict[str, str], field: str, words: str) -> None:
    got = alice.get(path, params=params)
    assert got.status_code == 422 and got.json()["detail"].startswith(field + ":") and words in got.text, got.text


def test_invalid_namespace_for_an_admin_is_422(admin: httpx.Client) -> None:
    got = admin.get("/v1/namespaces/-bad/memories/k")
    assert got.status_code == 422 and "path.ns" in got.json()["detail"]


def test_control_characters_in_a_key_are_422(alice: httpx.Client) -> None:
    got = alice.put("/v1/namespaces/alice/memories/a%00b", json={"text": "x"})
    assert got.status_code == 422 and got.json()["detail"] == (
        "path.key: must not contain control characters (U+0000-U+001F, U+007F)"
    )


def test_malformed_json_and_wrong_content_type(alice: httpx.Client) -> None:
    bad = alice.post(
        "/v1/namespaces/alice/search", content=b'{"query": "x",', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422 and bad.json()["detail"].startswith("the body is not valid JSON")
    form = alice.post("/v1/namespaces/alice/search", content=b"query=x", headers={"content-type": "text/plain"})
    assert form.status_code == 422 and "Content-Type: application/json" in form.json()["detail"]
    untyped = alice.post("/v1/namespaces/alice/search", content=b'{"query": "x"}')  # JSON, but not declared
    assert untyped.status_code == 422 and "Content-Type: application/json" in untyped.json()["detail"]
    nan = alice.put(
        f"/v1/namespaces/alice/memories/{unique()}",
        content=b'{"text": "x", "metadata": {"a": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422 and "NaN" in nan.json()["detail"]


def test_generate_errors(alice: httpx.Client) -> None:
    too_many = alice.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 300})
    assert too_many.status_code == 422 and "at most 256" in too_many.json()["detail"]
    over_cap = alice.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 5000})
    assert over_cap.status_code == 422 and "body.max_new_tokens" in over_cap.json()["detail"]
    task = alice.post("/v1/generate", json={"prompt": "hi", "task": "poetry"})
    assert task.status_code == 422 and "body.task" in task.json()["detail"]
    blank = alice.post("/v1/generate", json={"prompt": " \n "})
    assert blank.status_code == 422
    unknown_ns = alice.post(
        "/v1/generate", json={"prompt": "hi", "namespace": "alice", "as_of": "2000-01-01T00:00:00Z"}
    )
    assert unknown_ns.status_code in (200, 404)  # alice has memories, but none as of 2000: never a 500


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"x" * n
        sent += n


def test_a_body_over_the_limit_is_413(server: Server, alice: httpx.Client, reference: Store) -> None:
    key = unique()
    path = f"/v1/namespaces/alice/memories/{key}"
    over = alice.put(path, content=b'{"text": "' + b"x" * MIB + b'"}', headers={"content-type": "application/json"})
    assert over.status_code == 413 and "1048576 bytes" in over.json()["detail"]
    chunked = alice.put(path, content=_chunks(MIB + 1), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    exactly = b'{"text": "' + b"x" * (MIB - 12) + b'"}'
    assert len(exactly) == MIB
    at_limit = alice.put(path, content=exactly, headers={"content-type": "application/json"})  # the store says no
    assert at_limit.status_code == 422 and "at most 32768 characters" in at_limit.json()["detail"]
    assert reference.history("alice", key) == []
    with server.client() as anonymous:  # no key: 401 before the body is even looked at
        assert anonymous.put(path, content=b"x" * (2 * MIB)).status_code == 401
