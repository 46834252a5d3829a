"""The router: which memories a request uses and how (the selection matrix as data).

``Router()`` reads the shipped table (``table.toml``); ``Router.from_spec("window")`` is a fixed
strategy. ``router.route(Request(n_tokens, token_bytes, task, memory_budget_mb, ...), signal)``
returns a :class:`Route` with the KV policy sized to the memory budget, whether the store pays,
and the reasons. :mod:`memfusion.router.calibrate` fits the retrieval threshold and margin.
"""

from __future__ import annotations

from memfusion.router.calibrate import Calibration, MarginCalibration, fit_margin, fit_threshold
from memfusion.router.route import Request, RetrievalSignal, Route, Router, estimate_task
from memfusion.router.table import Rule, Table, load_table, parse_table

__all__ = [
    "Calibration",
    "MarginCalibration",
    "Request",
    "RetrievalSignal",
    "Route",
    "Router",
    "Rule",
    "Table",
    "estimate_task",
    "fit_margin",
    "fit_threshold",
    "load_table",
    "parse_table",
]
