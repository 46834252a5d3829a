"""Several processes on one store: SIGKILL crash safety of a writer and compare-and-set under
contention, on SQLite and PostgreSQL (on PostgreSQL the killed process is the client: its open
transaction must roll back whole).

Children are started with the ``spawn`` method and run the bodies in ``tests.store._workers``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from memfusion.store import Op, open_store
from memfusion.store.embed import HashingEmbedder
from tests.store._workers import DIM, cas_incrementer, crash_writer
from tests.store.conftest import pg_url

CTX = multiprocessing.get_context("spawn")
KILLS = 24  # of which EARLY are killed without waiting for a first write (open, recovery, DDL)
EARLY = 4


def _acks(path: Path) -> list[tuple[str, str, int, str]]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # a line is complete once its newline is written
    return [(op, key, int(version), text.replace("_", " ")) for op, key, version, text in map(str.split, lines)]


def _verify(url: str, acks: list[tuple[str, str, int, str]]) -> None:
    """Every acknowledged write is there with its content; chains are intact; check() is clean."""
    with open_store(url, embedder=HashingEmbedder(DIM)) as store:
        histories = {key: store.history("crash", key) for key in {k for op, k, _, _ in acks if op != "link"}}
        for hist in histories.values():
            assert [r.version for r in hist] == list(range(1, len(hist) + 1))
            assert all(a.committed_at < b.committed_at for a, b in itertools.pairwise(hist))
        for op, key, version, text in acks:
            if op == "link":
                src, relation, dst = key.split("|")
                live = store.neighbors("crash", src, relation=relation)
                assert any(e.dst == dst and e.version >= version for e in live)
                continue
            rec = histories[key][version - 1]
            assert rec.deleted == (op == "delete")
            if op == "put":
                assert rec.text == text
        report = store.check()
        assert report.ok, report


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_at_random_moments_loses_no_acknowledged_write(backend: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crash.db'}" if backend == "sqlite" else pg_url(tmp_path)
    ack_path = tmp_path / "acks.txt"
    rng = random.Random(20240611)
    killed_while_writing = 0
    for run in range(KILLS):
        before = len(_acks(ack_path))
        child = CTX.Process(target=crash_writer, args=(url, str(ack_path), run))
        child.start()
        if run >= EARLY:
            deadline = time.monotonic() + 60
            while len(_acks(ack_path)) == before and child.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert child.is_alive(), f"writer {run} died on its own (exit code {child.exitcode})"
            time.sleep(rng.uniform(0.0, 0.12))
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        acks = _acks(ack_path)
        killed_while_writing += int(len(acks) > before)
        _verify(url, acks)
    assert killed_while_writing >= 20
    with open_store(url, embedder=HashingEmbedder(DIM)) as store:
        puts = sum(1 for e in store.audit("crash", limit=1_000_000) if e.op is Op.PUT)
    assert puts >= sum(1 for a in _acks(ack_path) if a[0] == "put")


def _run_cas(url: str, processes: int, increments: int) -> None:
    open_store(url, embedder=HashingEmbedder(DIM)).close()  # create the schema once
    start, results = CTX.Event(), CTX.Queue()
    workers = [CTX.Process(target=cas_incrementer, args=(url, increments, w, start, results)) for w in range(processes)]
    for w in workers:
        w.start()
    start.set()
    reports = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    total = processes * increments
    assert sorted(r[1] for r in reports) == [increments] * processes
    assert sum(r[3] for r in reports) == 0  # every conflict carried a newer current_version
    with open_store(url, embedder=HashingEmbedder(DIM)) as store:
        final = store.get("cas", "counter")
        assert (final.text, final.version) == (str(total), total)
        hist = store.history("cas", "counter")
        assert [r.text for r in hist] == [str(v) for v in range(1, total + 1)]  # no lost or torn update
        assert Counter(r.actor for r in hist) == {f"w{w}": increments for w in range(processes)}
        audit = store.audit("cas", limit=total + 1)
        assert [(e.op, e.old_version, e.new_version) for e in audit] == [
            (Op.PUT, v or None, v + 1) for v in range(total)
        ]
        assert store.check().ok
    conflicts = sum(r[2] for r in reports)
    print(f"{processes} x {increments} CAS increments: {conflicts} conflicts reported and retried")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_four_processes_compare_and_set_500_increments(backend: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cas.db'}" if backend == "sqlite" else pg_url(tmp_path)
    _run_cas(url, processes=4, increments=500)
