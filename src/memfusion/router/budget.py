"""KV memory of each policy as a function of the context length, and sizing a policy to a budget.

The model is the accounting of :class:`memfusion.kv.KVStats` (``bytes_resident`` per layer, the
prefill chunk in flight counted in ``peak_bytes``), in closed form per policy. With ``t`` the
bytes of K and V of one token over all layers (:func:`token_bytes`), ``n`` the context length,
``b`` the token budget and ``c`` the prefill chunk:

============  ===========================================  ==========================================
policy        resident bytes                               parameters from ``b``
============  ===========================================  ==========================================
dense/paged   ``n t``                                      none (``paged``: ``page_size`` 16)
quest         ``n t (1 + 1 / page_size)`` (min/max keys)   ``token_budget = min(b, 1024)`` (work)
window        ``b t``                                      ``window = b - sinks``, ``sinks = 4``
snapkv / h2o  ``b t``                                      ``budget = b``
cca           ``b t + (n / 16) t``  (one core per group)   ``local = b``, ``group_size = 16``
tiered        ``b t + n t / 32`` (page mean keys)          ``window = b``, 4 pages of 16 retrieved
quant         ``min(n, 128) t + max(0, n - 128) t q``      4 bits, groups of 32: ``q = 3 / 16``
============  ===========================================  ==========================================

The peak adds one prefill chunk in one layer: ``peak = resident + c t / layers``. Estimates are upper bounds of what the
stats report (the engine checks the real ``peak_bytes`` against the budget after each request).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memfusion.errors import InvalidInput

PAGE = 16
SINKS = 4
QUANT_RESIDUAL = 128
QUANT_RATIO = 3 / 16
"""4-bit codes (1/8 of fp32) plus a float scale and zero per group of 32 (1/16): 3/16 of fp32 bytes.
For fp16 / bf16 models the scales weigh more: see :func:`quant_ratio`."""
QUEST_BUDGET = 1024
"""Tokens Quest attends to per decode step when routed (its work budget; it keeps every page)."""
MIN_BUDGET = 64
"""The smallest token budget the router gives a bounded policy."""

BOUNDED = ("window", "snapkv", "h2o", "tiered", "cca")
"""Policies whose resident memory follows the token budget."""
UNBOUNDED = ("dense", "paged", "quest", "quant")
"""Policies whose resident memory follows the context length."""


def token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """Bytes of K and V for one token in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * elem_bytes


def quant_ratio(elem_bytes: int) -> float:
    """Bytes of a 4-bit quantised element (code + its share of a scale and a zero per 32) over
    ``elem_bytes``; scales are kept in the model's dtype."""
    return (0.5 + 2 * elem_bytes / 32) / elem_bytes


_RESIDENT: dict[str, Callable[[int, int, int, float], float]] = {
    "dense": lambda n, b, t, q: n * t,
    "paged": lambda n, b, t, q: n * t,
    "quest": lambda n, b, t, q: n * t * (1 + 1 / PAGE),
    "window": lambda n, b, t, q: min(n, b) * t,
    "snapkv": lambda n, b, t, q: min(n, b) * t,
    "h2o": lambda n, b, t, q: min(n, b) * t,
    "cca": lambda n, b, t, q: min(n, b) * t + n / PAGE * t,
    "tiered": lambda n, b, t, q: min(n, b) * t + n * t / (2 * PAGE),
    "quant": lambda n, b, t, q: min(n, QUANT_RESIDUAL) * t + max(0, n - QUANT_RESIDUAL) * t * q,
}


def estimate_bytes(
    policy: str, n_tokens: int, budget: int, tbytes: int, chunk: int, elem_bytes: int = 4, layers: int = 1
) -> int:
    """Peak KV bytes of ``policy`` on ``n_tokens`` tokens with token budget ``budget`` (see the
    table); ``tbytes`` covers all ``layers``, the chunk in flight is in one layer at a time."""
    if policy not in _RESIDENT:
        raise InvalidInput(f"no memory model for policy {policy!r}; known: {', '.join(sorted(_RESIDENT))}")
    resident = _RESIDENT[policy](n_tokens, budget, tbytes, quant_ratio(elem_bytes))
    return int(resident + min(chunk, n_tokens) * tbytes / layers)


def policy_params(policy: str, budget: int) -> dict[str, Any]:
    """Keyword parameters of :func:`memfusion.kv.generate` for ``policy`` at token budget ``budget``."""
    table: dict[str, dict[str, Any]] = {
        "dense": {},
        "paged": {"page_size": PAGE},
        "quest": {"token_budget": max(PAGE, min(budget, QUEST_BUDGET)), "page_size": PAGE},
        "window": {"window": max(1, budget - SINKS), "sinks": SINKS},
        "snapkv": {"budget": budget, "obs_window": max(1, min(32, budget // 2))},
        "h2o": {"budget": budget, "recent": max(0, min(64, budget // 4))},
        "cca": {"group_size": PAGE, "local": budget},
        "tiered": {"window": budget, "page_size": PAGE, "retrieve_pages": 4},
        "quant": {"bits": 4, "group_size": 32, "residual": QUANT_RESIDUAL},
    }
    if policy not in table:
        raise InvalidInput(f"no parameters for policy {policy!r}; known: {', '.join(sorted(table))}")
    return table[policy]


@dataclass(frozen=True)
class Sizing:
    """A policy sized to a request: its token budget and the estimated peak bytes."""

    policy: str
    budget: int
    peak_bytes: int


def size_policy(
    policy: str, n_tokens: int, memory_bytes: int | None, tbytes: int, chunk: int, elem_bytes: int = 4, layers: int = 1
) -> Sizing | None:
    """The policy at the largest token budget whose peak fits ``memory_bytes`` (all ``n_tokens``
    when no budget is given or everything fits); None when it cannot fit even at
    :data:`MIN_BUDGET` tokens (or, for an unbounded policy, at all)."""
    full = max(n_tokens, 1)
    if (
        memory_bytes is None
        or estimate_bytes(policy, n_tokens, full, tbytes, chunk, elem_bytes, layers) <= memory_bytes
    ):
        return Sizing(policy, full, estimate_bytes(policy, n_tokens, full, tbytes, chunk, elem_bytes, layers))
    if policy not in BOUNDED:
        return None
    lo, hi = MIN_BUDGET, full  # largest b in [lo, hi] that fits: the estimate grows with b
    if estimate_bytes(policy, n_tokens, lo, tbytes, chunk, elem_bytes, layers) > memory_bytes:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_bytes(policy, n_tokens, mid, tbytes, chunk, elem_bytes, layers) <= memory_bytes:
            lo = mid
        else:
            hi = mid - 1
    return Sizing(policy, lo, estimate_bytes(policy, n_tokens, lo, tbytes, chunk, elem_bytes, layers))


def smallest_feasible_bytes(
    policies: tuple[str, ...], n_tokens: int, tbytes: int, chunk: int, elem_bytes: int = 4, layers: int = 1
) -> int:
    """The least memory any of ``policies`` needs on ``n_tokens`` tokens (bounded ones at
    :data:`MIN_BUDGET`)."""
    return min(
        estimate_bytes(p, n_tokens, MIN_BUDGET if p in BOUNDED else max(n_tokens, 1), tbytes, chunk, elem_bytes, layers)
        for p in policies
    )
