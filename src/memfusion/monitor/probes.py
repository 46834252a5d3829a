"""Memory probes: the process's resident set (now and at its peak) and torch's CUDA peak.

Figures are bytes. :func:`rss_bytes` reads the resident page count from ``/proc/self/statm``
(Linux) times the page size. :func:`peak_rss_bytes` reads ``getrusage(RUSAGE_SELF).ru_maxrss``,
which Linux (and the BSDs) report in KiB and macOS in bytes: the high-water mark since the
process started. Linux keeps RSS in per-CPU counters that ``ru_maxrss`` folds in lazily, so
it can trail the current figure by a few pages; the peak returned is the larger of the two, so
``peak_rss_bytes() >= rss_bytes()`` always holds. Where there is no ``/proc``, :func:`rss_bytes`
falls back to the peak. ``resource`` is a POSIX module: these probes are for Linux and macOS.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _statm_rss_bytes() -> int | None:
    """Resident bytes from ``/proc/self/statm`` (field 2, in pages); None without ``/proc``."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rusage_peak_bytes() -> int:
    """``ru_maxrss`` in bytes (KiB on Linux and the BSDs, bytes on macOS)."""
    import resource

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes: ``ru_maxrss`` (converted from KiB on
    Linux), or the current resident size when that is larger (the kernel's peak lags by a few pages)."""
    return max(_rusage_peak_bytes(), _statm_rss_bytes() or 0)


def rss_bytes() -> int:
    """This process's current resident set size in bytes (``/proc/self/statm`` field 2 x page size);
    the peak (:func:`peak_rss_bytes`) where ``/proc`` is missing."""
    now = _statm_rss_bytes()
    return now if now is not None else _rusage_peak_bytes()


def cuda_peak_bytes(device: torch.device | str | int | None = None) -> int | None:
    """Peak bytes torch has allocated on a CUDA device since the last ``reset_peak_memory_stats``
    (``torch.cuda.max_memory_allocated``); None when CUDA is unavailable or ``device`` is not a CUDA
    device. ``device=None`` means the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    if device is not None and not isinstance(device, int) and torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))
