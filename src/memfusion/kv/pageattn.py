"""Decode attention over selected pages, read in place (quest's CPU kernel).

Quest's torch path gathers the selected pages into a contiguous buffer, then attends over it:
each selected K/V byte is read, written and read again. This kernel computes the same softmax
attention reading every selected key and value exactly once, straight from the page-major
buffers: per KV head, the logits of its ``G`` query heads over the selected pages, a max-shifted
softmax, then the probability-weighted sum of the values. It is compiled by numba (``parallel``
over sequences x KV heads, ``fastmath`` so the ``D``-wide dot products vectorise) the first time
it runs; ``cache=True`` keeps the machine code between processes.

It serves float32 CPU tensors; quest keeps its gather path for other dtypes, CUDA tensors and
when numba is not installed (:func:`available`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

_FAST = {"reassoc", "contract", "nsz", "arcp"}
"""fastmath without ``nnan``/``ninf``: masked slots are ``-inf`` logits."""


@cache
def _kernel() -> Any:
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
    def attend(q, k, v, sel, last, mask, scaling, out):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # q (B, Hq, D); k, v (B, Hkv, C, S, D); sel (B, Hkv, P) page indices, the current page last;
        # last: valid slots of the current page; mask (B, Hkv, P*S) bool or (0, 0, 0); out (B, Hq, D)
        b_n, hq, d_n = q.shape
        h_n, s_n = k.shape[1], k.shape[3]
        g_n = hq // h_n
        p_n = sel.shape[2]
        masked = mask.shape[0] > 0
        for bh in numba.prange(b_n * h_n):
            b, h = bh // h_n, bh % h_n
            logits = np.empty((g_n, p_n * s_n), dtype=np.float32)
            for p in range(p_n):
                page = sel[b, h, p]
                n = s_n if p < p_n - 1 else last
                for s in range(s_n):
                    i = p * s_n + s
                    if s >= n or (masked and not mask[b, h, i]):
                        for g in range(g_n):
                            logits[g, i] = -np.inf
                        continue
                    for g in range(g_n):
                        acc = np.float32(0.0)
                        for j in range(d_n):
                            acc += q[b, h * g_n + g, j] * k[b, h, page, s, j]
                        logits[g, i] = acc * scaling
            for g in range(g_n):
                top = logits[g].max()
                total = np.float32(0.0)
                for i in range(p_n * s_n):
                    e = np.exp(logits[g, i] - top)
                    logits[g, i] = e
                    total += e
                for i in range(p_n * s_n):
                    logits[g, i] /= total
                for j in range(d_n):
                    out[b, h * g_n + g, j] = 0.0
            for p in range(p_n):
                page = sel[b, h, p]
                n = s_n if p < p_n - 1 else last
                for s in range(n):
                    i = p * s_n + s
                    for g in range(g_n):
                        w = logits[g, i]
                        if w == 0.0:
                            continue
                        for j in range(d_n):
                            out[b, h * g_n + g, j] += w * v[b, h, page, s, j]

    return attend


@cache
def _bounds_kernel() -> Any:
    import numba

    @numba.njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
    def bounds(q_pos, q_neg, kmin, kmax, out):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # q_pos, q_neg (B, Hkv, D); kmin, kmax (B, Hkv, C, D); out (B, Hkv, P) with P <= C
        b_n, h_n, p_n = out.shape
        d_n = q_pos.shape[2]
        for bh in numba.prange(b_n * h_n):
            b, h = bh // h_n, bh % h_n
            for p in range(p_n):
                acc = q_pos[b, h, 0] * kmax[b, h, p, 0] + q_neg[b, h, 0] * kmin[b, h, p, 0]
                for j in range(1, d_n):
                    acc += q_pos[b, h, j] * kmax[b, h, p, j] + q_neg[b, h, j] * kmin[b, h, p, j]
                out[b, h, p] = acc

    return bounds


@cache
def available() -> bool:
    """numba is installed (the kernel can be compiled)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def serves(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The kernel handles these tensors: float32 on the CPU, numba installed."""
    return q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and available()


def page_bounds(
    q_pos: torch.Tensor, q_neg: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, pages: int
) -> torch.Tensor:
    """``(B, Hkv, pages)``: ``q_pos . kmax + q_neg . kmin`` of the first ``pages`` pages, each bound
    row read once. ``q_pos``, ``q_neg`` ``(B, Hkv, D)`` (the group-summed positive / negative parts of
    the query); ``kmin``, ``kmax`` ``(B, Hkv, C, D)`` contiguous."""
    b, h, _ = q_pos.shape
    out = torch.empty(b, h, pages, dtype=q_pos.dtype)
    _bounds_kernel()(q_pos.contiguous().numpy(), q_neg.contiguous().numpy(), kmin.numpy(), kmax.numpy(), out.numpy())
    return out


def page_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    last: int,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of one decode query over the selected pages, read in place.

    ``q (B, Hq, 1, D)``; ``k``, ``v`` ``(B, Hkv, C, S, D)`` contiguous page-major buffers;
    ``sel (B, Hkv, P)`` page indices (the current page last); ``last``: written slots of the
    current page (its slots past ``last`` are left out); ``mask (B, Hkv, P*S)`` bool, False for
    slots to leave out (padding). Every attended row must keep at least one slot (the query's
    own). Returns ``(B, 1, Hq, D)``, the layout of :func:`memfusion.kv.attention.grouped_attention`.
    """
    b, hq, _, d = q.shape
    out = torch.empty(b, hq, d, dtype=q.dtype)
    none = torch.zeros(0, 0, 0, dtype=torch.bool)
    _kernel()(
        q.reshape(b, hq, d).contiguous().numpy(),
        k.numpy(),
        v.numpy(),
        sel.contiguous().numpy(),
        int(last),
        (none if mask is None else mask.contiguous()).numpy(),
        float(scaling),
        out.numpy(),
    )
    return out.view(b, 1, hq, d)
