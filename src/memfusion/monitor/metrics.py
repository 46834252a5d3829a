"""The metrics registry: one :class:`Monitor` turns finished requests into Prometheus metrics and JSON lines.

The engine builds one :class:`RequestFigures` per request and calls :meth:`Monitor.observe`; the
bench reads the same figures back (:meth:`Monitor.snapshot`), so every figure has one source.

Metric names carry the monitor's namespace (``memfusion_`` by default):

==================================  =========  ==================================================
name                                type       what
==================================  =========  ==================================================
``prefill_seconds``                 histogram  prefill wall time of a request
``decode_seconds_per_token``        histogram  decode_seconds / new_tokens (when new_tokens > 0)
``retrieval_seconds``               histogram  store search time
``request_seconds``                 histogram  the trace's total (when a trace is given)
``tokens_per_second``               histogram  new_tokens / decode_seconds (both > 0)
``kv_peak_bytes``                   histogram  the KV cache's peak bytes during the request
``page_recall``                     histogram  a sparse policy's page-selection recall, in [0, 1]
``kv_bytes_resident``               gauge      KV bytes resident after the last request
``requests_total{status}``          counter    requests by status, ``ok`` / ``error``
``route_total{route}``              counter    requests by route strategy (``dense``, ``window`` ...)
``tokens_generated_total``          counter    new tokens
``prompt_tokens_total``             counter    prompt tokens
``prefix_hits_total``               counter    prefix-cache pages found stored
``prefix_lookups_total``            counter    prefix-cache pages looked up
``retrieval_hits_total``            counter    facts retrieved and used
``retrieval_misses_total``          counter    retrievals that returned nothing usable
==================================  =========  ==================================================

Bucket edges (upper bounds, ``+Inf`` is added by the client) suit CPU figures:
:data:`LATENCY_BUCKETS` 1 ms to 60 s in 1-2-5 steps (then 30 s, 60 s); :data:`BYTES_BUCKETS`
1 KiB to 64 GiB in powers of 4; :data:`TOKENS_PER_SECOND_BUCKETS` 0.5 to 10 000 in 1-2-5 steps;
:data:`RECALL_BUCKETS` 0.1 to 1.0 in tenths, plus 0.95 and 0.99.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import threading
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from memfusion.errors import InvalidInput
from memfusion.monitor.trace import Trace

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
"""Seconds: 1 ms (a retrieval, a decode step of a small model) to 60 s (a long CPU prefill)."""

BYTES_BUCKETS: tuple[float, ...] = tuple(float(4**k * 1024) for k in range(14))
"""Bytes: 1 KiB, 4 KiB, 16 KiB ... 16 GiB, 64 GiB (powers of 4)."""

TOKENS_PER_SECOND_BUCKETS: tuple[float, ...] = (
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
)  # fmt: skip
"""Generated tokens per second of decode time."""

RECALL_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
"""Page-selection recall: tenths, with finer edges near 1 where good policies sit."""

STATUSES = ("ok", "error")
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_DURATIONS = ("prefill_seconds", "decode_seconds", "retrieval_seconds")
_COUNTS = (
    "new_tokens",
    "prompt_tokens",
    "retrieval_hits",
    "retrieval_misses",
    "prefix_hits",
    "prefix_lookups",
)
_BYTES = ("kv_bytes_resident", "kv_peak_bytes")


@dataclass
class RequestFigures:
    """The figures of one finished request (None / 0: not measured or not applicable).

    Invariants (checked in ``__post_init__`` and again by :meth:`Monitor.observe`): ``status`` is
    ``"ok"`` or ``"error"``; ``route`` is None or a non-empty string; durations are None or finite
    and >= 0; counts and byte sizes are integers >= 0 (bytes may be None); ``prefix_hits <=
    prefix_lookups``; ``page_recall`` is None or in [0, 1].
    """

    status: str
    route: str | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    new_tokens: int = 0
    prompt_tokens: int = 0
    retrieval_seconds: float | None = None
    retrieval_hits: int = 0
    retrieval_misses: int = 0
    kv_bytes_resident: int | None = None
    kv_peak_bytes: int | None = None
    prefix_hits: int = 0
    prefix_lookups: int = 0
    page_recall: float | None = None
    trace: Trace | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidInput` naming the first field that breaks an invariant."""
        if self.status not in STATUSES:
            raise InvalidInput(f"RequestFigures.status must be one of {STATUSES}, got {self.status!r}")
        if self.route is not None and (not isinstance(self.route, str) or not self.route):
            raise InvalidInput(f"RequestFigures.route must be None or a non-empty strategy name, got {self.route!r}")
        for name in _DURATIONS:
            _check_number(name, getattr(self, name), optional=True)
        for name in _COUNTS:
            _check_count(name, getattr(self, name), optional=False)
        for name in _BYTES:
            _check_count(name, getattr(self, name), optional=True)
        if self.prefix_hits > self.prefix_lookups:
            raise InvalidInput(
                f"RequestFigures.prefix_hits ({self.prefix_hits}) exceeds prefix_lookups ({self.prefix_lookups}): "
                "a hit is a lookup that found a stored page"
            )
        recall = _check_number("page_recall", self.page_recall, optional=True)
        if recall is not None and recall > 1.0:
            raise InvalidInput(f"RequestFigures.page_recall must lie in [0, 1], got {self.page_recall!r}")
        if self.trace is not None and not isinstance(self.trace, Trace):
            raise InvalidInput(f"RequestFigures.trace must be a Trace or None, got {type(self.trace).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: numbers as plain int / float, the trace as :meth:`Trace.to_dict` (or None)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "trace":
                out["trace"] = None if value is None else value.to_dict()
            elif isinstance(value, bool) or value is None or isinstance(value, str):
                out[f.name] = value
            elif isinstance(value, numbers.Integral):
                out[f.name] = int(value)
            else:
                out[f.name] = float(value)
        return out


def _check_number(name: str, value: object, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"RequestFigures.{name} must be a number{' or None' if optional else ''}, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x < 0:
        raise InvalidInput(f"RequestFigures.{name} must be finite and >= 0, got {value!r}")
    return x


def _check_count(name: str, value: object, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInput(f"RequestFigures.{name} must be an integer{' or None' if optional else ''}, got {value!r}")
    if int(value) < 0:
        raise InvalidInput(f"RequestFigures.{name} must be >= 0, got {value!r}")


def _escape(label_value: str) -> str:
    """A label value as the exposition format writes it (backslash, quote and newline escaped)."""
    return label_value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


class Monitor:
    """Prometheus metrics (in a registry of its own) and an optional JSON-lines log of requests.

    Invariants: each Monitor owns its ``registry`` (never the process-wide default), so several
    monitors in one process never share samples; :meth:`observe` holds a lock, so each request's
    figures land in every metric, and its JSON line in the file, as one step (no interleaving);
    the JSON-lines file gets exactly one line per observed request, written by opening the file
    in append mode each time (a crash loses at most the line in flight).
    """

    def __init__(self, namespace: str = "memfusion", jsonl_path: str | Path | None = None) -> None:
        if not isinstance(namespace, str) or not _NAME.match(namespace):
            raise InvalidInput(
                f"Monitor namespace must be a Prometheus name ([a-zA-Z_:][a-zA-Z0-9_:]*), got {namespace!r}"
            )
        self.namespace = namespace
        self.jsonl_path = None if jsonl_path is None else Path(jsonl_path)
        if self.jsonl_path is not None:
            if self.jsonl_path.is_dir():
                raise InvalidInput(f"jsonl_path {str(self.jsonl_path)!r} is a directory; give a file path")
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        ns, reg = namespace, self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, namespace=ns, registry=reg, buckets=buckets)

        def count(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labelnames=labels, namespace=ns, registry=reg)

        self._prefill = hist("prefill_seconds", "Prefill wall time per request (s).", LATENCY_BUCKETS)
        self._decode_per_token = hist(
            "decode_seconds_per_token", "Decode wall time per generated token (s).", LATENCY_BUCKETS
        )
        self._retrieval = hist("retrieval_seconds", "Store retrieval wall time per request (s).", LATENCY_BUCKETS)
        self._request = hist("request_seconds", "Whole-request wall time from its trace (s).", LATENCY_BUCKETS)
        self._kv_peak = hist("kv_peak_bytes", "Peak KV-cache bytes during a request.", BYTES_BUCKETS)
        self._tps = hist("tokens_per_second", "Generated tokens per second of decode.", TOKENS_PER_SECOND_BUCKETS)
        self._recall = hist("page_recall", "Sparse page-selection recall against the oracle.", RECALL_BUCKETS)
        self._kv_resident = Gauge(
            "kv_bytes_resident", "KV-cache bytes resident after the last request.", namespace=ns, registry=reg
        )
        self._requests = count("requests_total", "Requests by status.", ("status",))
        for status in STATUSES:  # export both series from the start, at 0
            self._requests.labels(status=status)
        self._routes = count("route_total", "Requests by route strategy.", ("route",))
        self._tokens = count("tokens_generated_total", "Generated tokens.")
        self._prompt = count("prompt_tokens_total", "Prompt tokens.")
        self._prefix_hits = count("prefix_hits_total", "Prefix-cache pages found already stored.")
        self._prefix_lookups = count("prefix_lookups_total", "Prefix-cache pages looked up.")
        self._ret_hits = count("retrieval_hits_total", "Retrieved facts used in a prompt.")
        self._ret_misses = count("retrieval_misses_total", "Retrievals that returned nothing usable.")

    @property
    def content_type(self) -> str:
        """The HTTP Content-Type of :meth:`exposition`."""
        return str(CONTENT_TYPE_LATEST)

    def observe(self, fig: RequestFigures) -> None:
        """Record one finished request: every metric its figures carry (None fields leave their
        histogram untouched), and one JSON line when ``jsonl_path`` is set. A given trace is
        :meth:`~Trace.finish`-ed here, so ``request_seconds`` and later ``trace.to_dict()`` agree."""
        if not isinstance(fig, RequestFigures):
            raise InvalidInput(f"Monitor.observe takes a RequestFigures, got {type(fig).__name__}")
        fig.validate()  # fields may have been changed since construction
        with self._lock:
            if fig.trace is not None:
                fig.trace.finish()
            line = None
            if self.jsonl_path is not None:  # serialise before touching a metric: a bad trace changes nothing
                record = {"time": datetime.now(UTC).isoformat(), **fig.to_dict()}
                line = json.dumps(record, allow_nan=False, separators=(",", ":"))
            self._requests.labels(status=fig.status).inc()
            if fig.route is not None:
                self._routes.labels(route=fig.route).inc()
            if fig.prefill_seconds is not None:
                self._prefill.observe(float(fig.prefill_seconds))
            if fig.decode_seconds is not None and fig.new_tokens > 0:
                decode = float(fig.decode_seconds)
                self._decode_per_token.observe(decode / int(fig.new_tokens))
                if decode > 0:
                    self._tps.observe(int(fig.new_tokens) / decode)
            if fig.retrieval_seconds is not None:
                self._retrieval.observe(float(fig.retrieval_seconds))
            if fig.trace is not None:
                self._request.observe(fig.trace.total_seconds())
            if fig.kv_peak_bytes is not None:
                self._kv_peak.observe(int(fig.kv_peak_bytes))
            if fig.kv_bytes_resident is not None:
                self._kv_resident.set(int(fig.kv_bytes_resident))
            if fig.page_recall is not None:
                self._recall.observe(float(fig.page_recall))
            self._tokens.inc(int(fig.new_tokens))
            self._prompt.inc(int(fig.prompt_tokens))
            self._prefix_hits.inc(int(fig.prefix_hits))
            self._prefix_lookups.inc(int(fig.prefix_lookups))
            self._ret_hits.inc(int(fig.retrieval_hits))
            self._ret_misses.inc(int(fig.retrieval_misses))
            if line is not None and self.jsonl_path is not None:
                with self.jsonl_path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (serve it with :attr:`content_type`)."""
        with self._lock:
            return bytes(generate_latest(self.registry))

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``{'name{label="v"}': value}`` (``name`` alone when unlabelled), e.g.
        ``memfusion_requests_total{status="ok"}``, ``memfusion_prefill_seconds_bucket{le="0.5"}``,
        ``memfusion_prefill_seconds_count``. The client's ``*_created`` samples (wall-clock creation
        timestamps, not figures) are left out."""
        out: dict[str, float] = {}
        with self._lock:
            for family in self.registry.collect():
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sample.labels.items())
                    out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
        return out

    def __repr__(self) -> str:
        return f"Monitor(namespace={self.namespace!r}, jsonl_path={self.jsonl_path!r})"
