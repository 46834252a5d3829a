"""Every endpoint's happy path on the live server, checked against the same store opened directly."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from memfusion.store import Record, Store
from memfusion.store.records import Edge

from .conftest import Server, unique


def _time(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def assert_record(got: dict[str, Any], want: Record) -> None:
    """The JSON record is exactly the store's record (times compared as instants)."""
    assert set(got) == {
        "namespace", "key", "version", "text", "metadata", "committed_at", "actor", "reason",
        "valid_from", "valid_to", "expires_at", "deleted",
    }  # fmt: skip
    for name in ("namespace", "key", "version", "text", "metadata", "actor", "reason", "deleted"):
        assert got[name] == getattr(want, name), name
    for name in ("committed_at", "valid_from", "valid_to", "expires_at"):
        value = getattr(want, name)
        assert (got[name] is None and value is None) or _time(got[name]) == value, name


def assert_edge(got: dict[str, Any], want: Edge) -> None:
    for name in ("namespace", "src", "relation", "dst", "version", "actor", "metadata", "deleted"):
        assert got[name] == getattr(want, name), name
    assert _time(got["committed_at"]) == want.committed_at


def put(c: httpx.Client, ns: str, key: str, **body: Any) -> httpx.Response:
    return c.put(f"/v1/namespaces/{ns}/memories/{key}", json=body)


def test_put_get_history_delete(alice: httpx.Client, reference: Store) -> None:
    key = unique()
    r1 = put(alice, "alice", key, text="amber falcon is 4721", metadata={"topic": "birds"}, reason="first")
    assert r1.status_code == 200, r1.text
    assert r1.json()["version"] == 1 and r1.json()["actor"] == "alice"  # the actor is the API key's name
    assert_record(r1.json(), reference.get("alice", key))
    r2 = put(alice, "alice", key, text="amber falcon is 4722", expected_version=1)
    assert r2.status_code == 200 and r2.json()["version"] == 2
    got = alice.get(f"/v1/namespaces/alice/memories/{key}")
    assert got.status_code == 200
    assert_record(got.json(), reference.get("alice", key))
    hist = alice.get(f"/v1/namespaces/alice/history/{key}")
    assert hist.status_code == 200
    want = reference.history("alice", key)
    assert [h["version"] for h in hist.json()] == [1, 2]
    for g, w in zip(hist.json(), want, strict=True):
        assert_record(g, w)
    gone = alice.delete(f"/v1/namespaces/alice/memories/{key}", params={"expected_version": 2, "reason": "wrong"})
    assert gone.status_code == 200 and gone.json()["deleted"] is True and gone.json()["version"] == 3
    assert_record(gone.json(), reference.history("alice", key)[-1])
    missing = alice.get(f"/v1/namespaces/alice/memories/{key}")
    assert missing.status_code == 404 and key in missing.json()["detail"]


def test_keys_with_slashes_and_spaces_round_trip(alice: httpx.Client, reference: Store) -> None:
    key = f"{unique()}/notes/today is good"
    assert put(alice, "alice", key.replace(" ", "%20"), text="slashes are fine").status_code == 200
    got = alice.get(f"/v1/namespaces/alice/memories/{key.replace(' ', '%20')}")
    assert got.status_code == 200 and got.json()["key"] == key
    assert reference.get("alice", key).text == "slashes are fine"
    assert [h["version"] for h in alice.get(f"/v1/namespaces/alice/history/{key}").json()] == [1]


def test_stale_write_is_409_with_current_version(alice: httpx.Client, reference: Store) -> None:
    key = unique()
    for text in ("one", "two", "three"):
        assert put(alice, "alice", key, text=text).status_code == 200
    stale = put(alice, "alice", key, text="lost update", expected_version=1)
    assert stale.status_code == 409
    assert stale.json()["current_version"] == 3
    create_only = put(alice, "alice", key, text="again", expected_version=0)
    assert create_only.status_code == 409 and create_only.json()["current_version"] == 3
    stale_delete = alice.delete(f"/v1/namespaces/alice/memories/{key}", params={"expected_version": 2})
    assert stale_delete.status_code == 409 and stale_delete.json()["current_version"] == 3
    assert reference.get("alice", key).text == "three"  # nothing was written
    assert len(reference.history("alice", key)) == 3


def test_reject_policy_is_409_and_keep_both_keeps_both(alice: httpx.Client, reference: Store) -> None:
    key = unique()
    assert put(alice, "alice", key, text="first").status_code == 200
    rejected = put(alice, "alice", key, text="second", on_conflict="reject")
    assert rejected.status_code == 409 and rejected.json()["current_version"] == 1
    kept = put(alice, "alice", key, text="second", on_conflict="keep_both")
    assert kept.status_code == 200 and kept.json()["key"] == f"{key}#2"
    assert reference.get("alice", key).text == "first"
    assert reference.get("alice", f"{key}#2").text == "second"


def test_get_and_search_as_of(alice: httpx.Client, reference: Store) -> None:
    key, ns = unique(), "alice"
    v1 = put(alice, ns, key, text="the vault code is 1111 zebra", metadata={"tag": key}).json()
    v2 = put(alice, ns, key, text="the vault code is 2222 zebra", metadata={"tag": key}).json()
    t1 = _time(v1["committed_at"])
    assert _time(v2["committed_at"]) > t1
    then = alice.get(f"/v1/namespaces/{ns}/memories/{key}", params={"as_of": t1.isoformat()})
    assert then.status_code == 200 and then.json()["version"] == 1
    assert_record(then.json(), reference.get(ns, key, as_of=t1))
    before = alice.get(f"/v1/namespaces/{ns}/memories/{key}", params={"as_of": (t1 - timedelta(seconds=1)).isoformat()})
    assert before.status_code == 404
    body = {"query": "vault code zebra", "k": 5, "filter": {"tag": key}}
    now = alice.post(f"/v1/namespaces/{ns}/search", json=body).json()
    past = alice.post(f"/v1/namespaces/{ns}/search", json={**body, "as_of": t1.isoformat()}).json()
    assert [h["record"]["version"] for h in now] == [2]
    assert [h["record"]["version"] for h in past] == [1]
    want = reference.search(ns, "vault code zebra", 5, filter={"tag": key}, as_of=t1)
    assert len(past) == len(want) == 1
    assert_record(past[0]["record"], want[0].record)
    assert past[0]["score"] == pytest.approx(want[0].score, abs=1e-6)


def test_search_matches_the_store(alice: httpx.Client, reference: Store) -> None:
    tag = unique("tag")
    texts = ["red apples grow on trees", "the red planet is mars", "blue whales are large", "apples and pears"]
    for i, text in enumerate(texts):
        put(alice, "alice", f"{tag}-{i}", text=text, metadata={"tag": tag, "even": i % 2 == 0})
    for flt in ({"tag": tag}, {"tag": tag, "even": True}, {"tag": {"$in": [tag, "other"]}}):
        got = alice.post("/v1/namespaces/alice/search", json={"query": "red apples", "k": 3, "filter": flt})
        assert got.status_code == 200
        want = reference.search("alice", "red apples", 3, filter=flt)
        assert [(h["record"]["key"], h["record"]["version"]) for h in got.json()] == [
            (h.record.key, h.record.version) for h in want
        ]
        assert [h["score"] for h in got.json()] == pytest.approx([h.score for h in want], abs=1e-6)
        assert all(h["record"]["metadata"]["tag"] == tag for h in got.json())


def test_links_neighbors_unlink(alice: httpx.Client, reference: Store) -> None:
    a, b, c = unique("n"), unique("n"), unique("n")
    e1 = alice.post("/v1/namespaces/alice/links", json={"src": a, "relation": "knows", "dst": b})
    e2 = alice.post("/v1/namespaces/alice/links", json={"src": c, "relation": "likes", "dst": a, "metadata": {"w": 2}})
    assert e1.status_code == 200 and e2.status_code == 200
    t1 = _time(e2.json()["committed_at"])
    for direction in ("out", "in", "both"):
        got = alice.get(f"/v1/namespaces/alice/neighbors/{a}", params={"direction": direction})
        assert got.status_code == 200
        want = reference.neighbors("alice", a, direction=direction)
        assert len(got.json()) == len(want) == (2 if direction == "both" else 1)
        for g, w in zip(sorted(got.json(), key=lambda e: e["src"]), sorted(want, key=lambda e: e.src), strict=True):
            assert_edge(g, w)
    only = alice.get(f"/v1/namespaces/alice/neighbors/{a}", params={"direction": "both", "relation": "likes"})
    assert [e["src"] for e in only.json()] == [c]
    gone = alice.delete("/v1/namespaces/alice/links", params={"src": a, "relation": "knows", "dst": b})
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert alice.get(f"/v1/namespaces/alice/neighbors/{a}").json() == []
    then = alice.get(f"/v1/namespaces/alice/neighbors/{a}", params={"as_of": t1.isoformat()})
    assert [e["dst"] for e in then.json()] == [b]
    again = alice.delete("/v1/namespaces/alice/links", params={"src": a, "relation": "knows", "dst": b})
    assert again.status_code == 404


def test_audit(alice: httpx.Client, reference: Store) -> None:
    key = unique()
    start = datetime.now(UTC) - timedelta(seconds=1)
    put(alice, "alice", key, text="audited")
    alice.delete(f"/v1/namespaces/alice/memories/{key}")
    got = alice.get("/v1/namespaces/alice/audit", params={"since": start.isoformat(), "limit": 100_000})
    assert got.status_code == 200
    mine = [e for e in got.json() if e["key"] == key]
    assert [(e["op"], e["old_version"], e["new_version"], e["actor"]) for e in mine] == [
        ("put", None, 1, "alice"),
        ("delete", 1, 2, "alice"),
    ]
    want = reference.audit("alice", since=start, limit=100_000)
    assert [e["seq"] for e in got.json()] == [e.seq for e in want]
    limited = alice.get("/v1/namespaces/alice/audit", params={"limit": 1}).json()
    assert len(limited) == 1 and limited[0]["seq"] == reference.audit("alice", limit=1)[0].seq


def test_check_is_for_admin_keys(admin: httpx.Client, alice: httpx.Client, reference: Store) -> None:
    got = admin.get("/v1/check")
    assert got.status_code == 200
    report = got.json()
    assert report["ok"] is True and report["records"] > 0
    assert alice.get("/v1/check").status_code == 403


def test_generate_uses_the_namespace(alice: httpx.Client, bob: httpx.Client) -> None:
    key = unique("fact")
    put(alice, "alice", key, text=f"the {key} code is 4721")
    prompt = f"Some document.\nWhat is the {key} code?"
    got = alice.post("/v1/generate", json={"prompt": prompt, "namespace": "alice", "max_new_tokens": 4})
    assert got.status_code == 200, got.text
    out = got.json()
    assert len(out["tokens"]) == out["stats"]["new_tokens"] <= 4
    assert out["route"]["strategy"] and out["route"]["kv_policy"]
    assert out["stats"]["prompt_tokens"] > 0 and out["stats"]["latency"]["total"] > 0
    assert out["stats"]["kv"]["peak_bytes"] > 0
    assert all(h["record"]["namespace"] == "alice" for h in out["stats"]["retrieved"])
    if out["route"]["retrieve"]:
        assert key in out["prompt"]
    nothing = alice.post("/v1/generate", json={"prompt": "Hello there", "max_new_tokens": 2})
    assert nothing.status_code == 200 and nothing.json()["stats"]["retrieved"] == []
    assert bob.post("/v1/generate", json={"prompt": prompt, "namespace": "alice"}).status_code == 403


def test_generate_past_its_deadline_is_504(alice: httpx.Client) -> None:
    got = alice.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 2, "timeout_s": 1e-9})
    assert got.status_code == 504
    assert "deadline" in got.json()["detail"]


def _sample(text: str, name: str, labels: str) -> float:
    """The value of one sample of the Prometheus text (0 if absent)."""
    pattern = re.escape(name + "{" + labels + "}") + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_requests_by_route_and_status(server: Server, alice: httpx.Client) -> None:
    route = 'method="PUT",route="/v1/namespaces/{ns}/memories/{key}"'
    before = httpx.get(f"{server.base}/metrics").text
    key = unique()
    for _ in range(3):
        put(alice, "alice", key, text="counted")
    put(alice, "alice", key, text="stale", expected_version=1)
    alice.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 1})
    after = httpx.get(f"{server.base}/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    name = "memfusion_http_requests_total"
    assert _sample(after.text, name, route + ',status="200"') - _sample(before, name, route + ',status="200"') == 3
    assert _sample(after.text, name, route + ',status="409"') - _sample(before, name, route + ',status="409"') == 1
    ok = 'status="ok"'
    assert _sample(after.text, "memfusion_requests_total", ok) - _sample(before, "memfusion_requests_total", ok) == 1
    assert "alice" not in after.text  # route templates only: no namespace or key names


def test_health_and_openapi(server: Server) -> None:
    assert httpx.get(f"{server.base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.base}/readyz").json() == {"status": "ready"}
    schema = httpx.get(f"{server.base}/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/v1/namespaces/{ns}/memories/{key}",
        "/v1/namespaces/{ns}/history/{key}",
        "/v1/namespaces/{ns}/search",
        "/v1/namespaces/{ns}/links",
        "/v1/namespaces/{ns}/neighbors/{node}",
        "/v1/namespaces/{ns}/audit",
        "/v1/check",
        "/v1/generate",
        "/metrics",
        "/healthz",
        "/readyz",
    } <= paths
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
