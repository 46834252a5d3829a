"""The one error hierarchy of memfusion: a caller can catch :class:`MemfusionError`.

Every message says what was wrong and what to do instead.
"""

from __future__ import annotations


class MemfusionError(Exception):
    """Base class of every error raised on purpose by memfusion."""


class InvalidInput(MemfusionError, ValueError):
    """Bad user input: a wrong shape, an unknown name, a value out of range, NaN, ..."""


class UnsupportedModel(InvalidInput):
    """A model whose architecture memfusion cannot drive (the class is named in the message)."""


class BudgetExceeded(MemfusionError):
    """A memory or latency budget that cannot be met; the message names the smallest feasible one."""


class VersionConflict(MemfusionError):
    """A compare-and-set write against a stale version; carries the current version."""

    def __init__(self, message: str, current_version: int | None = None) -> None:
        super().__init__(message)
        self.current_version = current_version


class StoreUnavailable(MemfusionError):
    """The store could not be reached or stayed locked too long; nothing was written. Retry later."""


class NotFound(MemfusionError, KeyError):
    """A requested record, key or namespace does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
