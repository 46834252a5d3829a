"""Child-process bodies for test_processes (importable by a ``spawn`` child: no test deps)."""

from __future__ import annotations

import os
from typing import Any

from memfusion.errors import NotFound, VersionConflict
from memfusion.store import open_store
from memfusion.store.embed import HashingEmbedder

DIM = 16
KEYS = 5


def crash_writer(url: str, ack_path: str, run: int) -> None:
    """Write forever; after each acknowledged write append ``op key version text`` to ``ack_path``.

    The parent SIGKILLs this process at a random moment; every line it finds was acknowledged
    (the write call had returned) before the line was written.
    """
    store = open_store(url, embedder=HashingEmbedder(DIM))
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    i = 0
    while True:
        key = f"k{i % KEYS}"
        text = f"run {run} write {i}"
        if i % 7 == 6:
            try:
                rec = store.delete("crash", key)
            except NotFound:
                i += 1
                continue
            line = f"delete {key} {rec.version} -\n"
        elif i % 11 == 10:
            edge = store.link("crash", key, "next", f"k{(i + 1) % KEYS}", metadata={"run": run})
            line = f"link {key}|next|k{(i + 1) % KEYS} {edge.version} -\n"
        else:
            rec = store.put("crash", key, text, metadata={"run": run, "i": i})
            line = f"put {key} {rec.version} {text.replace(' ', '_')}\n"
        os.write(fd, line.encode())
        i += 1


def cas_incrementer(url: str, n: int, worker: int, start: Any, results: Any) -> None:
    """Increment the counter ``n`` times by compare-and-set; report ``(worker, done, conflicts, bad)``.

    ``bad`` counts conflicts whose ``current_version`` was not newer than the version read
    (a conflict must always mean that someone else wrote in between).
    """
    store = open_store(url, embedder=HashingEmbedder(DIM))
    start.wait()
    done = conflicts = bad = 0
    while done < n:
        try:
            current = store.get("cas", "counter")
            value, version = int(current.text), current.version
        except NotFound:
            value, version = 0, 0
        try:
            store.put("cas", "counter", str(value + 1), expected_version=version, actor=f"w{worker}")
            done += 1
        except VersionConflict as err:
            conflicts += 1
            bad += int(err.current_version is None or err.current_version <= version)
    store.close()
    results.put((worker, done, conflicts, bad))
