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
    "window": lambda n: {"window": n, "sinks": 0},
}

TIGHT: dict[str, dict[str, Any]] = {
    "dense": {},
    "window": {"window": 16, "sinks": 4},
}
