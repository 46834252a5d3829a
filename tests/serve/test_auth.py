"""The auth matrix (tenants x namespaces x endpoints), isolation between tenants, rate limits.

Expected statuses come from the keys file (:data:`TENANTS`) by a rule written here, not from
the server: no key or an unknown key -> 401; no right, or a read right on a write -> 403;
otherwise the endpoint's own answer (fixed per endpoint and per "seeded or empty namespace").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from memfusion.serve.auth import Right

from .conftest import TENANTS, Server, unique

SEED = "seed"
NAMESPACES = ("alice", "bob", "shared", "ghost")  # "ghost": a namespace nobody ever wrote (fresh per test)
Call = Callable[[httpx.Client, str], httpx.Response]

# endpoint -> (is a write, the call, status when allowed on a seeded namespace, on an empty one)
ENDPOINTS: dict[str, tuple[bool, Call, int, int]] = {
    "get": (False, lambda c, ns: c.get(f"/v1/namespaces/{ns}/memories/{SEED}"), 200, 404),
    "history": (False, lambda c, ns: c.get(f"/v1/namespaces/{ns}/history/{SEED}"), 200, 200),
    "search": (False, lambda c, ns: c.post(f"/v1/namespaces/{ns}/search", json={"query": "seed"}), 200, 200),
    "neighbors": (False, lambda c, ns: c.get(f"/v1/namespaces/{ns}/neighbors/{SEED}"), 200, 200),
    "audit": (False, lambda c, ns: c.get(f"/v1/namespaces/{ns}/audit", params={"limit": 5}), 200, 200),
    "generate": (
        False,
        lambda c, ns: c.post("/v1/generate", json={"prompt": "What is seed?", "namespace": ns, "max_new_tokens": 1}),
        200,
        404,
    ),
    "put": (True, lambda c, ns: c.put(f"/v1/namespaces/{ns}/memories/{unique()}", json={"text": "hello"}), 200, 200),
    "delete": (True, lambda c, ns: c.delete(f"/v1/namespaces/{ns}/memories/{unique()}"), 404, 404),
    "link": (
        True,
        lambda c, ns: c.post(f"/v1/namespaces/{ns}/links", json={"src": SEED, "relation": "r", "dst": unique()}),
        200,
        200,
    ),
    "unlink": (
        True,
        lambda c, ns: c.delete(f"/v1/namespaces/{ns}/links", params={"src": SEED, "relation": "r", "dst": unique()}),
        404,
        404,
    ),
}
CALLERS = (*TENANTS, "no-key", "wrong-key")


def expected(caller: str, namespace: str, endpoint: str) -> int:
    write, _, seeded, empty = ENDPOINTS[endpoint]
    if caller not in TENANTS:
        return 401
    rights = TENANTS[caller][0]
    granted = {Right(r) for ns, r in rights.items() if ns in (namespace, "*")}
    if not granted or (write and Right.READ_WRITE not in granted):
        return 403
    return empty if namespace == "ghost" else seeded


@pytest.fixture(scope="module", autouse=True)
def seeded(server: Server) -> None:
    """The admin writes ``seed`` (and an edge from it) into alice, bob and shared."""
    with server.client("admin") as admin:
        for ns in ("alice", "bob", "shared"):
            assert admin.put(f"/v1/namespaces/{ns}/memories/{SEED}", json={"text": f"seed of {ns}"}).status_code == 200
            link = {"src": SEED, "relation": "r", "dst": "other"}
            assert admin.post(f"/v1/namespaces/{ns}/links", json=link).status_code == 200


def _client(server: Server, caller: str) -> httpx.Client:
    if caller == "no-key":
        return server.client()
    if caller == "wrong-key":
        return server.client(headers={"Authorization": "Bearer mf_not-a-key-anyone-has"})
    return server.client(caller)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("caller", [c for c in CALLERS if c != "throttled"])
def test_auth_matrix(server: Server, caller: str, namespace: str, endpoint: str) -> None:
    ns = f"ghost-{unique()}" if namespace == "ghost" else namespace
    with _client(server, caller) as client:
        got = ENDPOINTS[endpoint][1](client, ns)
    want = expected(caller, namespace, endpoint)
    assert got.status_code == want, got.text
    if want == 401:
        assert got.headers["www-authenticate"] == "Bearer"
        assert got.json() == {
            "detail": "missing or unknown API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        }
    if want == 403:
        assert got.json() == {"detail": "this API key has no right to this operation on the requested namespace"}


def test_the_expected_statuses_cover_every_outcome() -> None:
    """The matrix is not vacuous: it holds allowed, read-only-refused, foreign and unauthenticated cells."""
    outcomes = {expected(c, n, e) for c in CALLERS for n in NAMESPACES for e in ENDPOINTS}
    assert {200, 401, 403, 404} <= outcomes
    assert expected("bob", "shared", "search") == 200 and expected("bob", "shared", "put") == 403


def _refusal(resp: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    return resp.status_code, resp.content, {k: v for k, v in resp.headers.items() if k not in ("date",)}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_403_reveals_nothing_about_a_foreign_namespace(server: Server, endpoint: str) -> None:
    """bob on alice's namespace (which exists) and on one that does not: byte-identical answers."""
    call = ENDPOINTS[endpoint][1]
    with server.client("bob") as bob:
        existing = _refusal(call(bob, "alice"))
        never = _refusal(call(bob, f"ghost-{unique()}"))
        invalid = _refusal(call(bob, "-not-even-valid"))
    assert existing[0] == 403
    assert existing == never == invalid


def test_refusals_come_before_validation(server: Server) -> None:
    """A malformed body into a foreign namespace is 403 (not 422); without a key it is 401."""
    bad = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    with server.client("bob") as bob, server.client() as anonymous:
        assert bob.put("/v1/namespaces/alice/memories/k", **bad).status_code == 403
        assert bob.post("/v1/namespaces/alice/search", json={"k": -1}).status_code == 403
        assert anonymous.put("/v1/namespaces/bob/memories/k", **bad).status_code == 401
        assert bob.put("/v1/namespaces/bob/memories/k", **bad).status_code == 422


def test_both_key_headers_work(server: Server) -> None:
    token = server.tokens["alice"]
    for headers in ({"Authorization": f"Bearer {token}"}, {"X-API-Key": token}, {"authorization": f"bearer {token}"}):
        assert httpx.get(f"{server.base}/v1/namespaces/alice/audit", headers=headers).status_code == 200
    for headers in ({"Authorization": f"Basic {token}"}, {"Authorization": "Bearer"}, {"X-API-Key": token + "x"}):
        assert httpx.get(f"{server.base}/v1/namespaces/alice/audit", headers=headers).status_code == 401


def test_tenants_are_isolated(server: Server) -> None:
    """alice and bob write the same key: each reads, searches and audits only their own."""
    key = unique("same")
    with server.client("alice") as alice, server.client("bob") as bob:
        alice.put(f"/v1/namespaces/alice/memories/{key}", json={"text": f"alice secret {key} purple"})
        bob.put(f"/v1/namespaces/bob/memories/{key}", json={"text": f"bob note {key} purple"})
        assert alice.get(f"/v1/namespaces/alice/memories/{key}").json()["text"].startswith("alice")
        assert bob.get(f"/v1/namespaces/bob/memories/{key}").json()["text"].startswith("bob")
        hits = bob.post("/v1/namespaces/bob/search", json={"query": f"alice secret {key} purple", "k": 50}).json()
        assert hits and all(h["record"]["namespace"] == "bob" for h in hits)
        assert not any("alice secret" in h["record"]["text"] for h in hits)
        audit = bob.get("/v1/namespaces/bob/audit", params={"limit": 100_000}).json()
        assert all(e["namespace"] == "bob" for e in audit)
        assert all(e["actor"] != "alice" for e in audit)
        shared = bob.post("/v1/namespaces/shared/search", json={"query": "seed"}).json()
        assert all(h["record"]["namespace"] == "shared" for h in shared)


def _statuses(client: httpx.Client, n: int, request: Callable[[httpx.Client], httpx.Response]) -> list[Any]:
    return [request(client) for _ in range(n)]


def test_rate_limit_is_429_per_key(server: Server) -> None:
    """throttled: burst 2 at 0.01/s -> the third request in a row is refused; others are not affected."""
    with server.client("throttled") as throttled, server.client("alice") as alice:
        got = _statuses(throttled, 3, lambda c: c.get("/v1/namespaces/throttled/audit"))
        assert [r.status_code for r in got] == [200, 200, 429]
        retry = int(got[2].headers["retry-after"])
        assert 1 <= retry <= 100  # one token every 100 s
        assert "rate limit" in got[2].json()["detail"]
        assert alice.get("/v1/namespaces/alice/audit").status_code == 200
