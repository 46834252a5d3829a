"""Monitor: the Prometheus exposition parsed back and checked against figures computed by hand."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memfusion.errors import InvalidInput
from memfusion.monitor import Monitor, RequestFigures, Trace
from memfusion.monitor.metrics import BYTES_BUCKETS, LATENCY_BUCKETS, RECALL_BUCKETS, TOKENS_PER_SECOND_BUCKETS


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def parse(monitor: Monitor) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """family name -> [(sample name, labels, value)], from the text the monitor exposes."""
    text = monitor.exposition().decode("utf-8")
    families = text_string_to_metric_families(text)
    return {f.name: [(s.name, dict(s.labels), s.value) for s in f.samples] for f in families}


def sample(fams: dict[str, list[tuple[str, dict[str, str], float]]], name: str, **labels: str) -> float:
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    hits = [v for n, lab, v in fams[family] if n == name and lab == labels]
    assert len(hits) == 1, (name, labels, fams[family])
    return hits[0]


def buckets(fams: dict[str, list[tuple[str, dict[str, str], float]]], family: str) -> dict[float, float]:
    return {float(lab["le"]): v for n, lab, v in fams[family] if n == f"{family}_bucket"}


def reference_buckets(values: list[float], edges: tuple[float, ...]) -> dict[float, float]:
    """Brute force: a cumulative bucket counts the values <= its upper bound."""
    return {**{e: float(sum(v <= e for v in values)) for e in edges}, math.inf: float(len(values))}


FIGS = [
    RequestFigures(
        status="ok",
        route="dense",
        prefill_seconds=0.003,
        decode_seconds=0.8,
        new_tokens=16,
        prompt_tokens=100,
        retrieval_seconds=0.012,
        retrieval_hits=2,
        kv_bytes_resident=3_000_000,
        kv_peak_bytes=5_000_000,
        prefix_hits=1,
        prefix_lookups=4,
        page_recall=0.9,
    ),
    RequestFigures(
        status="ok",
        route="window",
        prefill_seconds=2.5,
        decode_seconds=3.0,
        new_tokens=30,
        prompt_tokens=4000,
        kv_bytes_resident=700,
        kv_peak_bytes=2_000,
        page_recall=1.0,
    ),
    RequestFigures(
        status="ok",
        route="dense",
        prefill_seconds=0.04,
        decode_seconds=0.0,
        new_tokens=0,
        prompt_tokens=7,
        retrieval_seconds=0.0005,
        retrieval_misses=1,
        prefix_lookups=2,
    ),
    RequestFigures(status="error"),
]


def test_counters_histograms_and_gauge_match_hand_computed_values() -> None:
    m = Monitor()
    for f in FIGS:
        m.observe(f)
    fams = parse(m)
    ns = "memfusion_"

    assert sample(fams, ns + "requests_total", status="ok") == 3
    assert sample(fams, ns + "requests_total", status="error") == 1
    assert sample(fams, ns + "route_total", route="dense") == 2
    assert sample(fams, ns + "route_total", route="window") == 1
    assert sample(fams, ns + "tokens_generated_total") == 16 + 30
    assert sample(fams, ns + "prompt_tokens_total") == 100 + 4000 + 7
    assert sample(fams, ns + "prefix_hits_total") == 1
    assert sample(fams, ns + "prefix_lookups_total") == 6
    assert sample(fams, ns + "retrieval_hits_total") == 2
    assert sample(fams, ns + "retrieval_misses_total") == 1
    assert sample(fams, ns + "kv_bytes_resident") == 700  # the gauge keeps the last value carried

    # Histograms: count, sum and every cumulative bucket against a brute-force reference.
    expected: dict[str, tuple[list[float], tuple[float, ...]]] = {
        "prefill_seconds": ([0.003, 2.5, 0.04], LATENCY_BUCKETS),
        "retrieval_seconds": ([0.012, 0.0005], LATENCY_BUCKETS),
        # request 3 generated nothing: no per-token figure and no rate.
        "decode_seconds_per_token": ([0.8 / 16, 3.0 / 30], LATENCY_BUCKETS),
        "tokens_per_second": ([16 / 0.8, 30 / 3.0], TOKENS_PER_SECOND_BUCKETS),
        "kv_peak_bytes": ([5_000_000, 2_000], BYTES_BUCKETS),
        "page_recall": ([0.9, 1.0], RECALL_BUCKETS),
        "request_seconds": ([], LATENCY_BUCKETS),  # no trace was given
    }
    for name, (values, edges) in expected.items():
        fam = ns + name
        assert sample(fams, fam + "_count") == len(values), name
        assert sample(fams, fam + "_sum") == pytest.approx(math.fsum(values), rel=1e-12, abs=0), name
        assert buckets(fams, fam) == reference_buckets(values, edges), name

    # A few buckets by hand as well, so the reference itself is checked.
    prefill = buckets(fams, ns + "prefill_seconds")
    assert (prefill[0.002], prefill[0.005], prefill[0.05], prefill[2.0], prefill[5.0]) == (0, 1, 2, 2, 3)
    tps = buckets(fams, ns + "tokens_per_second")
    assert (tps[5.0], tps[10.0], tps[20.0]) == (0, 1, 2)  # 10 tok/s and 20 tok/s sit on bucket edges
    kv = buckets(fams, ns + "kv_peak_bytes")
    assert (kv[1024.0], kv[4096.0], kv[4 * 1024**2], kv[16 * 1024**2]) == (0, 1, 1, 2)


def test_bucket_edges_cover_the_documented_ranges() -> None:
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 60.0
    assert BYTES_BUCKETS[0] == 1024 and BYTES_BUCKETS[-1] == 64 * 1024**3
    assert RECALL_BUCKETS[-1] == 1.0
    for edges in (LATENCY_BUCKETS, BYTES_BUCKETS, TOKENS_PER_SECOND_BUCKETS, RECALL_BUCKETS):
        assert list(edges) == sorted(set(edges))


def test_snapshot_agrees_with_exposition() -> None:
    m = Monitor()
    for f in FIGS:
        m.observe(f)
    snap = m.snapshot()
    fams = parse(m)
    from_text = {
        n + ("{" + ",".join(f'{k}="{v}"' for k, v in lab.items()) + "}" if lab else ""): v
        for samples in fams.values()
        for n, lab, v in samples
        if not n.endswith("_created")
    }
    assert snap.keys() == from_text.keys()
    for key, value in from_text.items():
        assert snap[key] == pytest.approx(value, rel=1e-12), key
    assert snap['memfusion_route_total{route="dense"}'] == 2
    assert snap['memfusion_prefill_seconds_bucket{le="0.005"}'] == 1
    assert not any("_created" in k for k in snap)


def test_two_monitors_do_not_share_samples_and_namespace_prefixes_names() -> None:
    a, b = Monitor(), Monitor(namespace="other")
    a.observe(RequestFigures(status="ok", route="dense", new_tokens=5))
    a2 = Monitor()  # same namespace as `a`, still its own registry
    assert a.snapshot()['memfusion_requests_total{status="ok"}'] == 1
    assert a2.snapshot()['memfusion_requests_total{status="ok"}'] == 0
    assert 'memfusion_route_total{route="dense"}' not in a2.snapshot()
    snap_b = b.snapshot()
    assert snap_b['other_requests_total{status="ok"}'] == 0
    assert all(k.startswith("other_") for k in snap_b)
    assert b"other_tokens_generated_total 0.0" in b.exposition()


def test_none_fields_leave_histograms_untouched() -> None:
    m = Monitor()
    m.observe(RequestFigures(status="ok", route="window", new_tokens=3, prompt_tokens=9))
    snap = m.snapshot()
    for name in (
        "prefill_seconds",
        "decode_seconds_per_token",
        "retrieval_seconds",
        "request_seconds",
        "tokens_per_second",
        "kv_peak_bytes",
        "page_recall",
    ):
        assert snap[f"memfusion_{name}_count"] == 0, name
        assert snap[f"memfusion_{name}_sum"] == 0, name
    assert snap["memfusion_kv_bytes_resident"] == 0
    assert snap["memfusion_tokens_generated_total"] == 3


def test_zero_decode_time_gives_per_token_but_no_rate() -> None:
    m = Monitor()
    m.observe(RequestFigures(status="ok", decode_seconds=0.0, new_tokens=4))
    snap = m.snapshot()
    assert snap["memfusion_decode_seconds_per_token_count"] == 1
    assert snap["memfusion_decode_seconds_per_token_sum"] == 0.0
    assert snap["memfusion_tokens_per_second_count"] == 0


def test_trace_total_goes_to_request_seconds_and_trace_is_finished() -> None:
    clock = FakeClock()
    tr = Trace("r1", clock=clock)
    with tr.span("prefill"):
        clock.t = 0.75
    clock.t = 1.5
    m = Monitor()
    m.observe(RequestFigures(status="ok", prefill_seconds=tr.seconds("prefill"), trace=tr))
    clock.t = 9.0  # after observe: the trace's total is frozen
    snap = m.snapshot()
    assert snap["memfusion_request_seconds_count"] == 1
    assert snap["memfusion_request_seconds_sum"] == 1.5
    assert snap['memfusion_request_seconds_bucket{le="1.0"}'] == 0
    assert snap['memfusion_request_seconds_bucket{le="2.0"}'] == 1
    assert tr.to_dict()["total_seconds"] == 1.5


def test_jsonl_one_line_per_observe_with_fields_and_trace(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "requests.jsonl"
    m = Monitor(jsonl_path=path)
    clock = FakeClock()
    tr = Trace("req-7", clock=clock)
    tr.set(namespace="alice")
    with tr.span("retrieval", hits=2):
        clock.t = 0.25
    tr.event("route", strategy="quest+store")
    figs = [*FIGS, RequestFigures(status="ok", route="quest+store", retrieval_seconds=0.25, trace=tr)]
    for f in figs:
        m.observe(f)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(figs)
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    field_names = [
        "status",
        "route",
        "prefill_seconds",
        "decode_seconds",
        "new_tokens",
        "prompt_tokens",
        "retrieval_seconds",
        "retrieval_hits",
        "retrieval_misses",
        "kv_bytes_resident",
        "kv_peak_bytes",
        "prefix_hits",
        "prefix_lookups",
        "page_recall",
    ]
    for f, rec in zip(figs, records, strict=True):
        assert set(rec) == {"time", "trace", *field_names}
        for name in field_names:
            assert rec[name] == getattr(f, name), name
        assert rec["time"].endswith("+00:00")
    assert [r["trace"] for r in records[:-1]] == [None] * len(FIGS)
    t = records[-1]["trace"]
    assert t == tr.to_dict()
    assert t["request_id"] == "req-7" and t["attrs"] == {"namespace": "alice"}
    assert t["spans"] == [{"name": "retrieval", "parent": None, "start": 0.0, "seconds": 0.25, "attrs": {"hits": 2}}]
    assert t["events"] == [{"name": "route", "at": 0.25, "attrs": {"strategy": "quest+store"}}]

    # A second monitor on the same file appends; nothing is truncated.
    Monitor(jsonl_path=path).observe(RequestFigures(status="error"))
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(figs) + 1


def test_concurrent_observes_count_exactly(tmp_path: Path) -> None:
    path = tmp_path / "threads.jsonl"
    m = Monitor(jsonl_path=path)
    n_threads, per_thread = 8, 50
    barrier = threading.Barrier(n_threads)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            m.observe(
                RequestFigures(
                    status="ok" if j % 5 else "error",
                    route=f"r{i % 2}",
                    prefill_seconds=0.01,
                    new_tokens=3,
                    prefix_hits=1,
                    prefix_lookups=2,
                )
            )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    snap = m.snapshot()
    total = n_threads * per_thread
    errors = n_threads * len(range(0, per_thread, 5))
    assert snap['memfusion_requests_total{status="ok"}'] + snap['memfusion_requests_total{status="error"}'] == total
    assert snap['memfusion_requests_total{status="error"}'] == errors
    assert snap['memfusion_route_total{route="r0"}'] == snap['memfusion_route_total{route="r1"}'] == total / 2
    assert snap["memfusion_tokens_generated_total"] == 3 * total
    assert snap["memfusion_prefix_lookups_total"] == 2 * total
    assert snap["memfusion_prefill_seconds_count"] == total
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == total
    assert all(json.loads(line)["new_tokens"] == 3 for line in lines)  # no torn or interleaved lines


def test_content_type_and_exposition_format() -> None:
    m = Monitor()
    assert m.content_type.startswith("text/plain")
    text = m.exposition().decode()
    assert "# TYPE memfusion_prefill_seconds histogram" in text
    assert "# TYPE memfusion_kv_bytes_resident gauge" in text
    assert "# TYPE memfusion_requests_total counter" in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": "done"},
        {"status": "ok", "route": ""},
        {"status": "ok", "prefill_seconds": -0.1},
        {"status": "ok", "decode_seconds": float("nan")},
        {"status": "ok", "retrieval_seconds": float("inf")},
        {"status": "ok", "new_tokens": -1},
        {"status": "ok", "prompt_tokens": 2.5},
        {"status": "ok", "retrieval_hits": True},
        {"status": "ok", "kv_peak_bytes": -5},
        {"status": "ok", "page_recall": 1.01},
        {"status": "ok", "page_recall": -0.01},
        {"status": "ok", "prefix_hits": 3, "prefix_lookups": 2},
        {"status": "ok", "trace": {"request_id": "x"}},
    ],
)
def test_request_figures_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        RequestFigures(**kwargs)


def test_observe_revalidates_mutated_figures_and_changes_nothing() -> None:
    m = Monitor()
    f = RequestFigures(status="ok", new_tokens=2)
    f.new_tokens = -2
    with pytest.raises(InvalidInput):
        m.observe(f)
    with pytest.raises(InvalidInput):
        m.observe({"status": "ok"})  # type: ignore[arg-type]
    assert m.snapshot()['memfusion_requests_total{status="ok"}'] == 0


@pytest.mark.parametrize("bad", ["", "1abc", "has-dash", "sp ace"])
def test_bad_namespace_is_rejected(bad: str) -> None:
    with pytest.raises(InvalidInput):
        Monitor(namespace=bad)


def test_jsonl_path_that_is_a_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        Monitor(jsonl_path=tmp_path)


def test_the_process_wide_default_registry_is_never_touched() -> None:
    from prometheus_client import REGISTRY

    before = {s.name for fam in REGISTRY.collect() for s in fam.samples}
    m = Monitor()
    m.observe(RequestFigures(status="ok", route="dense", prefill_seconds=0.1))
    after = {s.name for fam in REGISTRY.collect() for s in fam.samples}
    assert after == before
    assert not any(name.startswith("memfusion_") for name in after)
