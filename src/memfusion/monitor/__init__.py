"""Monitoring: per-request traces, a Prometheus metrics registry with JSON lines, timers, memory probes.

    from memfusion.monitor import Monitor, RequestFigures, Trace
    monitor = Monitor(jsonl_path="requests.jsonl")     # its own registry; one JSON line per request
    trace = Trace()
    with trace.span("prefill", tokens=512):
        ...                                            # run the model
    monitor.observe(RequestFigures(status="ok", route="window", prefill_seconds=trace.seconds("prefill"), trace=trace))

``monitor.exposition()`` is the Prometheus text (``monitor.content_type``); ``monitor.snapshot()``
a flat dict of every sample. :func:`timer` times a lone block; :func:`rss_bytes`,
:func:`peak_rss_bytes` and :func:`cuda_peak_bytes` read memory use.
"""

from memfusion.monitor.metrics import Monitor, RequestFigures
from memfusion.monitor.probes import cuda_peak_bytes, peak_rss_bytes, rss_bytes
from memfusion.monitor.trace import Timer, Trace, timer

__all__ = [
    "Monitor",
    "RequestFigures",
    "Timer",
    "Trace",
    "cuda_peak_bytes",
    "peak_rss_bytes",
    "rss_bytes",
    "timer",
]
