"""Trace and timer: exact offsets and durations against an injected clock, nesting, errors, JSON."""

from __future__ import annotations

import json
import math
from datetime import datetime

import pytest

from memfusion.errors import InvalidInput, MemfusionError
from memfusion.monitor import Trace, timer


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def test_nested_spans_exact_offsets_durations_and_parents() -> None:
    clock = FakeClock(100.0)
    tr = Trace("req-1", clock=clock)
    clock.advance(0.5)
    with tr.span("request") as outer:
        clock.advance(0.25)
        with tr.span("retrieval", namespace="alice") as s:
            clock.advance(0.125)
            s.set(hits=3)
        with tr.span("prefill", tokens=512):
            clock.advance(2.0)
            tr.event("route", strategy="window", reasons=["long"])
            with tr.span("layer"):
                clock.advance(1.0)
        outer.set(done=True)
        clock.advance(0.0625)
    with tr.span("decode"):
        clock.advance(4.0)

    got = [(s.name, s.parent, s.start, s.seconds) for s in tr.spans]
    # Expected by hand from the clock moves above (all binary fractions: exact in floating point).
    assert got == [
        ("request", None, 0.5, 0.25 + 0.125 + 3.0 + 0.0625),
        ("retrieval", "request", 0.75, 0.125),
        ("prefill", "request", 0.875, 3.0),
        ("layer", "prefill", 2.875, 1.0),
        ("decode", None, 3.9375, 4.0),
    ]
    assert tr.spans[1].attrs == {"namespace": "alice", "hits": 3}
    assert tr.spans[2].attrs == {"tokens": 512}
    assert tr.spans[0].attrs == {"done": True}
    assert [(e.name, e.at, e.attrs) for e in tr.events] == [
        ("route", 2.875, {"strategy": "window", "reasons": ["long"]})
    ]
    assert tr.total_seconds() == 7.9375
    assert tr.seconds("prefill") == 3.0
    assert tr.seconds("nothing") == 0.0


def test_seconds_sums_spans_of_one_name() -> None:
    clock = FakeClock()
    tr = Trace(clock=clock)
    durations = [0.1, 0.25, 0.003]
    for d in durations:
        with tr.span("retrieval"):
            clock.advance(d)
        clock.advance(1.0)  # gaps between spans are not counted
    assert tr.seconds("retrieval") == pytest.approx(math.fsum(durations), abs=1e-12)


def test_exception_closes_span_records_error_and_propagates() -> None:
    clock = FakeClock()
    tr = Trace(clock=clock)
    with pytest.raises(KeyError), tr.span("outer"):
        clock.advance(1.0)
        with tr.span("inner", step=1):
            clock.advance(0.5)
            raise KeyError("boom")
    outer, inner = tr.spans
    assert (inner.seconds, inner.attrs) == (0.5, {"step": 1, "error": "KeyError"})
    assert (outer.seconds, outer.attrs) == (1.5, {"error": "KeyError"})
    # The stack is empty again: a new span is top level.
    with tr.span("after"):
        pass
    assert tr.spans[-1].parent is None


def test_finish_freezes_total_and_is_idempotent() -> None:
    clock = FakeClock()
    tr = Trace(clock=clock)
    clock.advance(2.0)
    assert tr.total_seconds() == 2.0 and not tr.finished
    tr.finish()
    clock.advance(5.0)
    tr.finish()
    assert tr.total_seconds() == 2.0 and tr.finished
    assert tr.to_dict()["total_seconds"] == 2.0


def test_to_dict_is_json_and_round_trips() -> None:
    clock = FakeClock()
    tr = Trace("abc", clock=clock)
    tr.set(namespace="alice", tags=("a", "b"), nested={"k": [1, 2.5, None, False]})
    with tr.span("prefill", tokens=8):
        clock.advance(0.5)
    tr.event("route", strategy="quest+store")
    with tr.span("open"):
        d = tr.to_dict()  # taken while a span is open: its seconds is None
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back == d
    assert back["request_id"] == "abc"
    assert back["attrs"] == {"namespace": "alice", "tags": ["a", "b"], "nested": {"k": [1, 2.5, None, False]}}
    assert back["spans"][0] == {"name": "prefill", "parent": None, "start": 0.0, "seconds": 0.5, "attrs": {"tokens": 8}}
    assert back["spans"][1]["seconds"] is None
    assert back["events"] == [{"name": "route", "at": 0.5, "attrs": {"strategy": "quest+store"}}]
    started = datetime.fromisoformat(back["started_at"])
    assert started.utcoffset() is not None and started.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_default_request_id_is_unique_uuid_hex() -> None:
    a, b = Trace(), Trace()
    assert a.request_id != b.request_id
    assert len(a.request_id) == 32 and int(a.request_id, 16) >= 0


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan"), float("inf"), b"bytes", [1, object()], {1: "x"}])
def test_non_json_attribute_is_rejected_everywhere(bad: object) -> None:
    tr = Trace()
    with pytest.raises(InvalidInput):
        tr.set(x=bad)
    with pytest.raises(InvalidInput), tr.span("s", x=bad):
        pass
    with tr.span("t") as s, pytest.raises(InvalidInput):
        s.set(x=bad)
    with pytest.raises(InvalidInput):
        tr.event("e", x=bad)
    assert [s.name for s in tr.spans] == ["t"]  # the rejected span was never opened
    assert tr.events == () and tr.attrs == {}


def test_attributes_are_copied_when_recorded() -> None:
    tr = Trace()
    reasons = ["long"]
    tr.event("route", reasons=reasons)
    reasons.append("later")
    assert tr.events[0].attrs == {"reasons": ["long"]}


def test_bad_names_are_rejected() -> None:
    with pytest.raises(InvalidInput):
        Trace("")
    tr = Trace()
    with pytest.raises(InvalidInput), tr.span(""):
        pass
    with pytest.raises(InvalidInput):
        tr.event(None)  # type: ignore[arg-type]


def test_timer_with_fake_clock_and_on_error() -> None:
    clock = FakeClock()
    with timer(clock) as t:
        assert t.running
        with pytest.raises(MemfusionError):
            _ = t.seconds
        clock.advance(0.75)
    assert t.seconds == 0.75 and not t.running
    with pytest.raises(ZeroDivisionError), timer(clock) as t2:
        clock.advance(0.5)
        _ = 1 / 0
    assert t2.seconds == 0.5


def test_timer_real_clock_is_non_negative() -> None:
    with timer() as t:
        sum(range(1000))
    assert t.seconds >= 0.0
