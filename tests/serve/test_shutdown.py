"""Stopping the server during a stream of writes loses no acknowledged write.

Writer threads put versions of a few keys each and record every 2xx answer (key, version,
text). The server gets SIGTERM (graceful: in-flight requests finish, exit 0) or SIGKILL (no
warning at all) while they write; it is restarted on the same SQLite file and every recorded
write must be there, at its version, with its text.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Server, start_server

WRITERS = 4


def _write(server: Server, writer: int, acked: list[tuple[str, int, str]], stop: threading.Event) -> None:
    with server.client("alice") as client:
        i = 0
        while not stop.is_set():
            key, text = f"w{writer}-{i % 7}", f"writer {writer} write {i}"
            try:
                got = client.put(f"/v1/namespaces/alice/memories/{key}", json={"text": text})
            except httpx.TransportError:
                return  # the server is gone: what was acknowledged is recorded
            if got.status_code == 200:
                acked.append((key, got.json()["version"], text))
            elif got.status_code != 503:
                raise AssertionError(f"unexpected {got.status_code}: {got.text}")
            i += 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_acknowledged_write_is_lost(tmp_path: Path, keys_file: tuple[Path, dict[str, str]], sig: int) -> None:
    keys, tokens = keys_file
    db = tmp_path / "mem.db"
    server = start_server(tmp_path, db, keys, tokens)
    acked: list[tuple[str, int, str]] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_write, args=(server, w, acked, stop)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    code = server.stop(sig)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acked) >= 60
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), server.log.read_text()[-2000:]
    if sig == signal.SIGTERM:
        log = server.log.read_text()
        assert "Application shutdown complete" in log and "stopped by a signal" in log

    restarted = start_server(tmp_path, db, keys, tokens)
    try:
        with restarted.client("alice") as client:
            histories = {
                key: {r["version"]: r["text"] for r in client.get(f"/v1/namespaces/alice/history/{key}").json()}
                for key in {k for k, _, _ in acked}
            }
    finally:
        restarted.stop()
    lost = [(k, v, t) for k, v, t in acked if histories[k].get(v) != t]
    assert lost == [], f"{len(lost)} acknowledged writes lost or changed: {lost[:5]}"
    for key, versions in histories.items():  # versions are exactly 1..n: no gap, no torn write
        assert sorted(versions) == list(range(1, len(versions) + 1)), key


def test_a_server_without_a_model_private_metrics_and_a_short_timeout(
    tmp_path: Path, keys_file: tuple[Path, dict[str, str]]
) -> None:
    """``--model none``: generate is 503; ``--metrics-private``: /metrics needs an admin key;
    ``--request-timeout 1``: a body that trickles in is cut off with 408."""
    keys, tokens = keys_file
    extra = ("--metrics-private", "--request-timeout", "1")
    server = start_server(tmp_path, tmp_path / "mem.db", keys, tokens, *extra)
    try:
        with server.client("alice") as alice, server.client("admin") as admin, server.client() as anonymous:
            got = alice.post("/v1/generate", json={"prompt": "hello"})
            assert got.status_code == 503 and "--model" in got.json()["detail"]
            assert got.headers["retry-after"] == "1"
            assert anonymous.get("/metrics").status_code == 401
            assert alice.get("/metrics").status_code == 403  # admin keys only
            assert "memfusion_http_requests_total" in admin.get("/metrics").text
        port = int(server.base.rsplit(":", 1)[1])
        head = (
            "PUT /v1/namespaces/alice/memories/slow HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {tokens['alice']}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head.encode() + b'{"te')  # ... and never the rest
            status_line = sock.recv(65536).split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
    finally:
        assert server.stop() == 0
