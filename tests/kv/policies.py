"""The policy table every matrix test runs over (as kvpress's default_presses).

For each policy name in ``memfusion.kv.POLICIES``:
- ``LOSSLESS[name](length)``: parameters that make it keep everything for a prompt+generation of
  ``length`` tokens, so its outputs must equal ``dense``;
- ``TIGHT[name]``: parameters that force it to drop/compress, for the analytic byte count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LOSSLESS: dict[str, Callable[[int], dict[str, Any]]] = {
    "dense": lambda n: {},
    "paged": lambda n: {"page_size": 8},
    "window": lambda n: {"window": n, "sinks": 0},
    "snapkv": lambda n: {"budget": n, "obs_window": 4},
    "h2o": lambda n: {"budget": n, "recent": 4},
    "cca": lambda n: {"group_size": 4, "local": n},
    "tiered": lambda n: {"window": n, "page_size": 4, "retrieve_pages": 2},
    "quant": lambda n: {"bits": 4, "residual": n},  # residual >= every token slot: nothing quantised
    "quest": lambda n: {"token_budget": -(-n // 4) * 4, "page_size": 4, "dense_layers": 1},
}

TIGHT: dict[str, dict[str, Any]] = {
    "dense": {},
    "paged": {"page_size": 16},
    "window": {"window": 16, "sinks": 4},
    "snapkv": {"budget": 24, "obs_window": 4},
    "h2o": {"budget": 24, "recent": 8},
    "cca": {"group_size": 4, "local": 16},
    "tiered": {"window": 16, "page_size": 4, "retrieve_pages": 2},
    "quant": {"bits": 4, "group_size": 16, "residual": 16},
    "quest": {"token_budget": 16, "page_size": 4, "dense_layers": 1},
}
