"""Real ``memfusion serve`` processes on loopback, and real HTTP clients (httpx).

The session server (:func:`server`) runs ``python -m memfusion.cli_serve`` on a free port with
a temporary SQLite store (the hashing embedder: no model download, deterministic), the random
model (``/v1/generate`` works) and a keys file of five tenants (:data:`TENANTS`). Tests that
stop or restart a server start their own with :func:`start_server` (``--model none``: fast).
Tests share the session server, so each one writes under keys of its own (:func:`unique`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from memfusion.serve.auth import hash_key, new_key
from memfusion.store import Store, open_store
from memfusion.store.embed import HashingEmbedder

#: name -> (namespaces and rights, rate per second, burst). ``throttled`` exists for the 429 test.
TENANTS: dict[str, tuple[dict[str, str], float, int]] = {
    "alice": ({"alice": "rw"}, 1000.0, 1000),
    "bob": ({"bob": "rw", "shared": "r"}, 1000.0, 1000),
    "admin": ({"*": "rw"}, 10000.0, 10000),
    "throttled": ({"throttled": "rw"}, 0.01, 2),
}
EMBED_DIM = 256  # the CLI's --embedder hashing is HashingEmbedder(256)
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def write_keys(path: Path) -> dict[str, str]:
    """Write a keys file for :data:`TENANTS`; returns name -> the plain key a client sends."""
    tokens = {name: new_key() for name in TENANTS}
    entries = [
        {"name": name, "key_sha256": hash_key(tokens[name]), "namespaces": ns, "rate_per_s": rate, "burst": burst}
        for name, (ns, rate, burst) in TENANTS.items()
    ]
    path.write_text(json.dumps({"keys": entries}), encoding="utf-8")
    return tokens


@dataclass
class Server:
    """A running server process: ``base`` URL, ``tokens`` by tenant, the SQLite file it serves."""

    proc: subprocess.Popen[bytes]
    base: str
    db: Path
    log: Path
    tokens: dict[str, str]
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    def client(self, tenant: str | None = None, headers: dict[str, str] | None = None) -> httpx.Client:
        sent = {} if tenant is None else {"Authorization": f"Bearer {self.tokens[tenant]}"}
        return httpx.Client(base_url=self.base, headers={**sent, **(headers or {})}, timeout=60.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def open_store(self) -> Store:
        """The same SQLite file opened in this process (the reference the HTTP answers are checked against)."""
        return open_store(self.url, embedder=HashingEmbedder(EMBED_DIM))


def start_server(
    workdir: Path, db: Path, keys: Path, tokens: dict[str, str], *extra: str, model: str = "none"
) -> Server:
    """Start ``memfusion serve`` on a free loopback port; return once ``/readyz`` answers 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"server-{uuid.uuid4().hex[:6]}.log"
    args = [
        sys.executable,
        "-m",
        "memfusion.cli_serve",
        "--store",
        f"sqlite:///{db}",
        "--keys",
        str(keys),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--embedder",
        "hashing",
        "--model",
        model,
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180.0
    port = None
    while port is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        found = _LISTENING.search(log.read_text(errors="replace"))
        port = int(found.group(1)) if found else None
        time.sleep(0.05)
    server = Server(proc, f"http://127.0.0.1:{port}", db, log, tokens, args)
    while True:
        try:
            if httpx.get(f"{server.base}/readyz", timeout=5.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"the server never became ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("serve-keys") / "keys.json"
    return path, write_keys(path)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, keys_file: tuple[Path, dict[str, str]]) -> Iterator[Server]:
    """The session's server: random model, SQLite, the :data:`TENANTS` keys."""
    work = tmp_path_factory.mktemp("serve")
    keys, tokens = keys_file
    srv = start_server(work, work / "mem.db", keys, tokens, model="random")
    yield srv
    srv.stop()


@pytest.fixture
def alice(server: Server) -> Iterator[httpx.Client]:
    with server.client("alice") as c:
        yield c


@pytest.fixture
def bob(server: Server) -> Iterator[httpx.Client]:
    with server.client("bob") as c:
        yield c


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.client("admin") as c:
        yield c


@pytest.fixture
def reference(server: Server) -> Iterator[Store]:
    """The server's store, opened directly (another process on the same file)."""
    store = server.open_store()
    yield store
    store.close()
