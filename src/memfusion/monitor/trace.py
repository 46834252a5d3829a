"""One request's timeline (:class:`Trace`) and a lone stopwatch (:func:`timer`).

A :class:`Trace` holds named *spans* (a start offset, a duration, attributes, the name of the
enclosing span) and instant *events*, all timed by one monotonic clock
(``time.perf_counter`` unless a test injects another) and measured in seconds from the moment
the trace was created. :meth:`Trace.to_dict` is the JSON-safe form that the monitor writes as a
JSON line and the engine returns in its stats.

Attribute values are checked when they are recorded, so that ``to_dict`` is always JSON: ``None``,
``bool``, ``int``, finite ``float``, ``str``, and lists / tuples / dicts (string keys) of those.
Anything else (a tensor, a numpy integer, NaN, a set, an object) raises
:class:`~memfusion.errors.InvalidInput` at the call that passed it.

:func:`timer` is for callers who need one duration and no trace (the bench): one clock for every
figure the project reports, no hand-written ``perf_counter`` arithmetic.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from memfusion.errors import InvalidInput, MemfusionError

Clock = Callable[[], float]
"""A monotonic clock in seconds (``time.perf_counter``; tests pass a fake one)."""

_MAX_DEPTH = 32  # nesting allowed inside one attribute value (guards against self-referencing lists)


def json_safe(value: Any, where: str, _depth: int = 0) -> Any:
    """A copy of ``value`` made of JSON types only (tuples become lists); :class:`InvalidInput` if
    ``value`` holds anything else. ``where`` names the attribute in the error message."""
    if _depth > _MAX_DEPTH:
        raise InvalidInput(f"{where} is nested deeper than {_MAX_DEPTH} levels (a self-referencing list?)")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{where} is {value!r}: JSON has no NaN or infinity; record a finite number or None")
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple):
        return [json_safe(v, f"{where}[{i}]", _depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInput(f"{where} has the key {k!r} ({type(k).__name__}): JSON object keys are strings")
            out[k] = json_safe(v, f"{where}[{k!r}]", _depth + 1)
        return out
    raise InvalidInput(
        f"{where} is a {type(value).__name__} ({value!r:.60}): attributes must be JSON-safe "
        "(None, bool, int, finite float, str, or lists / dicts of those); convert it first, e.g. int(x) or x.tolist()"
    )


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"a {what} name must be a non-empty string, got {name!r}")
    return name


@dataclass
class Span:
    """One timed step of a request.

    ``start``: seconds from the trace's start to the span's start; ``seconds``: its duration, None
    while the span is still open; ``parent``: the name of the innermost span open when this one
    began (None at top level); ``attrs``: JSON-safe attributes (``error`` holds the exception's
    class name when the block raised).
    """

    name: str
    parent: str | None
    start: float
    seconds: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def set(self, **attrs: Any) -> None:
        """Add (or replace) attributes; values must be JSON-safe."""
        for key, value in attrs.items():
            self.attrs[key] = json_safe(value, f"span {self.name!r} attribute {key!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parent": self.parent,
            "start": self.start,
            "seconds": self.seconds,
            "attrs": json_safe(self.attrs, f"span {self.name!r} attrs"),
        }


@dataclass(frozen=True)
class Event:
    """An instant of a request: ``at`` seconds from the trace's start, with JSON-safe attributes."""

    name: str
    at: float
    attrs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "at": self.at, "attrs": json_safe(self.attrs, f"event {self.name!r} attrs")}


class Trace:
    """The timeline of one request.

    Invariants: ``spans`` are in the order they were opened (so by ``start``, a parent before its
    children); a span's ``start`` and an event's ``at`` are offsets from the trace's start on its
    clock and never decrease along the list; a closed span's ``seconds`` is >= 0; every attribute
    value is JSON-safe. A trace belongs to one request and is used from one thread at a time.

    The trace ends when :meth:`finish` is first called (the monitor calls it when it observes the
    request); until then :meth:`total_seconds` is the time elapsed so far.
    """

    def __init__(self, request_id: str | None = None, *, clock: Clock = time.perf_counter) -> None:
        if request_id is None:
            request_id = uuid.uuid4().hex
        self.request_id = _check_name(request_id, "request id")
        if not callable(clock):
            raise InvalidInput(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self._t0 = float(clock())
        self._end: float | None = None
        self.started_at = datetime.now(UTC)
        self.attrs: dict[str, Any] = {}
        self._spans: list[Span] = []
        self._events: list[Event] = []
        self._open: list[Span] = []  # the stack of spans entered and not yet left, innermost last

    def _now(self) -> float:
        """Seconds since the trace began."""
        return float(self._clock()) - self._t0

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(self._spans)

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def set(self, **attrs: Any) -> None:
        """Add (or replace) request-level attributes; values must be JSON-safe."""
        for key, value in attrs.items():
            self.attrs[key] = json_safe(value, f"trace attribute {key!r}")

    @contextmanager
    def span(self, name: str, **attrs: Any) -> Iterator[Span]:
        """Time the ``with`` block as a span called ``name``; yields the :class:`Span` (``span.set``
        adds attributes). An exception closes the span with ``error=<class name>`` and propagates."""
        _check_name(name, "span")
        s = Span(name=name, parent=self._open[-1].name if self._open else None, start=self._now())
        s.set(**attrs)
        self._spans.append(s)
        self._open.append(s)
        try:
            yield s
        except BaseException as exc:
            s.attrs["error"] = type(exc).__name__
            raise
        finally:
            s.seconds = max(0.0, self._now() - s.start)
            self._open.remove(s)

    def event(self, name: str, **attrs: Any) -> None:
        """Record an instant called ``name`` (a route decision, a cache hit) with attributes."""
        _check_name(name, "event")
        safe = {k: json_safe(v, f"event {name!r} attribute {k!r}") for k, v in attrs.items()}
        self._events.append(Event(name=name, at=self._now(), attrs=safe))

    def finish(self) -> None:
        """End the trace now (idempotent: the first call fixes the end); open spans stay open."""
        if self._end is None:
            self._end = self._now()

    @property
    def finished(self) -> bool:
        return self._end is not None

    def total_seconds(self) -> float:
        """From the start to :meth:`finish` (to now when not finished)."""
        return self._end if self._end is not None else self._now()

    def seconds(self, name: str) -> float:
        """Total duration of the closed spans called ``name`` (0.0 if none)."""
        return math.fsum(s.seconds for s in self._spans if s.name == name and s.seconds is not None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe timeline: request_id, started_at (UTC ISO-8601 wall clock), total_seconds,
        attrs, spans [{name, parent, start, seconds, attrs}] (seconds None if still open) and
        events [{name, at, attrs}]."""
        return {
            "request_id": self.request_id,
            "started_at": self.started_at.isoformat(),
            "total_seconds": self.total_seconds(),
            "attrs": json_safe(self.attrs, "trace attrs"),
            "spans": [s.to_dict() for s in self._spans],
            "events": [e.to_dict() for e in self._events],
        }

    def __repr__(self) -> str:
        return f"Trace({self.request_id!r}, spans={len(self._spans)}, events={len(self._events)})"


class Timer:
    """A stopwatch filled in by :func:`timer`: ``seconds`` is readable once the block has ended."""

    def __init__(self) -> None:
        self._seconds: float | None = None

    @property
    def running(self) -> bool:
        return self._seconds is None

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            raise MemfusionError("timer.seconds is set when the with block ends; read it after the block")
        return self._seconds

    def __repr__(self) -> str:
        return "Timer(running)" if self._seconds is None else f"Timer(seconds={self._seconds:.6f})"


@contextmanager
def timer(clock: Clock = time.perf_counter) -> Iterator[Timer]:
    """Time the ``with`` block: ``with timer() as t: ...`` then ``t.seconds``. The duration is set
    even when the block raises."""
    t = Timer()
    start = float(clock())
    try:
        yield t
    finally:
        t._seconds = max(0.0, float(clock()) - start)
