"""Validation of the write and read options beyond the ``check_*`` helpers of ``base``.

Every function raises :class:`~memfusion.errors.InvalidInput` with what to do, and runs
before the database is touched (so bad input leaves the store unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from memfusion.errors import InvalidInput
from memfusion.store.base import check_key, check_metadata, check_text, check_time
from memfusion.store.records import ConflictPolicy, Resolver, Write

MAX_REASON_CHARS = 1024
DIRECTIONS = ("out", "in", "both")


def check_actor(actor: Any) -> str:
    return check_key(actor, "actor")


def check_reason(reason: Any) -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise InvalidInput(f"reason must be None or a string of at most {MAX_REASON_CHARS} characters")
    return reason


MAX_TTL = 1000 * 365.25 * 86400
"""The longest ttl in seconds (an expiry past it would overflow dates; pass None for no expiry)."""


def check_ttl(ttl: Any) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise InvalidInput(f"ttl must be a positive finite number of seconds (or None for no expiry), got {ttl!r}")
    if ttl > MAX_TTL:
        raise InvalidInput(f"ttl must be at most {MAX_TTL:.0f} s (1000 years; None: no expiry), got {ttl!r}")
    return float(ttl)


def check_expected_version(expected: Any) -> int | None:
    if expected is None:
        return None
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidInput(
            f"expected_version must be None or an integer >= 0 (0: the key must not exist), got {expected!r}"
        )
    return expected


def check_interval(valid_from: Any, valid_to: Any) -> tuple[datetime | None, datetime | None]:
    start, end = check_time(valid_from, "valid_from"), check_time(valid_to, "valid_to")
    if start is not None and end is not None and not start < end:
        raise InvalidInput(f"valid_from ({start.isoformat()}) must be before valid_to ({end.isoformat()})")
    return start, end


def check_policy(policy: Any) -> ConflictPolicy | Resolver:
    """A :class:`ConflictPolicy`, its value as a string ("reject", ...), or a resolver callable."""
    if isinstance(policy, ConflictPolicy):
        return policy
    if isinstance(policy, str):
        try:
            return ConflictPolicy(policy)
        except ValueError:
            pass
    elif callable(policy):
        resolver: Callable[..., Any] = policy
        return resolver
    allowed = ", ".join(repr(p.value) for p in ConflictPolicy)
    raise InvalidInput(f"on_conflict must be a ConflictPolicy ({allowed}) or a callable resolve(current, incoming)")


def check_resolution(result: Any) -> ConflictPolicy | Write:
    """What a resolver returned: a policy, or a (validated) write to append."""
    if isinstance(result, ConflictPolicy):
        return result
    if isinstance(result, Write):
        return Write(text=check_text(result.text), metadata=check_metadata(result.metadata))
    raise InvalidInput(f"the on_conflict callback must return a ConflictPolicy or a Write, got {type(result).__name__}")


def check_direction(direction: Any) -> str:
    if direction not in DIRECTIONS:
        raise InvalidInput(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return str(direction)


def check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
    return limit
