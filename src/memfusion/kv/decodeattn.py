"""Decode attention on the CPU: one numba split-K kernel (flash-decoding) over runs of keys in place.

A decode step attends one query per sequence to keys that lie in *runs* of consecutive rows of a
layer's K/V buffer: ``dense`` / ``window`` / ``paged`` keep every key of a sequence's head in one
run, quest selects pages (a run of ``page_size`` rows each). The torch path (``k @ q^T``, softmax,
``probs @ v``) runs three ops, writes the logits and probabilities to memory and back, and
parallelises each op on its own; quest's used to gather the selected pages first.

:func:`run_attention` splits the runs of every (sequence, KV head) into tasks of about
:data:`CHUNK` keys (``parallel`` over all of them, so two KV heads still keep every core busy): a
task reads its K rows once (the logits of the head's ``G`` query heads, kept in an L1-sized
buffer), its V rows once (the weighted sum), and leaves the task's max logit, softmax denominator
and unnormalised output; a second kernel merges the tasks exactly
(``sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c``). Every K/V byte is read from memory once,
which is what the K/V read rate of ``memfusion bench --suite kv`` measures against the machine's
STREAM copy bandwidth. :func:`decode_attention` is the one-run case.

The kernels compile on first use (seconds; ``cache=True`` keeps the machine code between
processes) and serve float32 CPU tensors (:func:`serves`); other dtypes and CUDA take the torch
paths.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch

from memfusion.kv.kernels import FAST, exp_kernel, prefetch_kernel, serves

__all__ = ["CHUNK", "decode_attention", "run_attention", "serves"]

_NO_MASK = np.zeros((0, 0, 0), dtype=np.bool_)
"""The kernels' "no mask" argument (an empty array keeps one compiled signature)."""

CHUNK = 512
"""Keys per task: the ``(G, CHUNK)`` logits of a task stay in L1 (8 KiB for G = 4), and a 32K
context gives 64 tasks per KV head, plenty to balance two cores."""


SHORT_RUN = 64
"""Runs of at most this many keys (quest's pages) are software-prefetched ``AHEAD`` runs ahead."""
AHEAD = 2


@cache
def _split_kernel() -> Any:
    import numba

    exp_shifted = exp_kernel()
    prefetch_rows = prefetch_kernel()

    @numba.njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
    def split(q, k, v, first, size, last, mask, mask_offset, own, scaling, per_task, part_m, part_l, part_o):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # q (B, Hq, D); k, v (R, D) contiguous rows; first (B, Hkv, P): the first row of each run, the
        # runs of a (b, h) in key-position order: run p holds positions [p*size, p*size + size), the
        # last run only ``last`` of them; position ``own`` (or -1) is always attended; mask
        # (B, Hkv, M) bool or (0, 0, 0): position x is left out where mask[b, h, mask_offset + x] is False;
        # task (b, h, c) reads runs [c*per_task, (c+1)*per_task) and leaves part_m, part_l (B, Hkv, T, G)
        # (max logit, sum of exp) and part_o (B, Hkv, T, G, D) (unnormalised output)
        b_n, hq, d_n = q.shape
        h_n, p_n = first.shape[1], first.shape[2]
        g_n = hq // h_n
        t_n = part_m.shape[2]
        masked = mask.shape[0] > 0
        for t in numba.prange(b_n * h_n * t_n):
            b = t // (h_n * t_n)
            h = (t // t_n) % h_n
            c = t % t_n
            p_lo = c * per_task
            p_hi = min(p_lo + per_task, p_n)
            count = (p_hi - p_lo - 1) * size + (size if p_hi < p_n else last)
            qs = np.empty((g_n, d_n), dtype=np.float32)
            for g in range(g_n):
                for j in range(d_n):
                    qs[g, j] = q[b, h * g_n + g, j] * scaling
            logits = np.empty((g_n, count), dtype=np.float32)
            for p in range(p_lo, p_hi):
                row0 = first[b, h, p]
                if size <= SHORT_RUN and p + AHEAD < p_hi:  # short runs: fetch a later run's rows meanwhile
                    prefetch_rows(k, first[b, h, p + AHEAD], size)
                for s in range(size if p < p_n - 1 else last):
                    i = (p - p_lo) * size + s
                    pos = p * size + s
                    if masked and pos != own and not mask[b, h, mask_offset + pos]:
                        for g in range(g_n):
                            logits[g, i] = -np.inf
                        continue
                    for g in range(g_n):
                        acc = np.float32(0.0)
                        for j in range(d_n):
                            acc += qs[g, j] * k[row0 + s, j]
                        logits[g, i] = acc
            acc_o = np.zeros((g_n, d_n), dtype=np.float32)
            bits = np.empty(count, dtype=np.int32)
            for g in range(g_n):
                row = logits[g]
                top = row.max()
                part_m[b, h, c, g] = top
                if top > -np.inf:
                    for i in range(count):
                        row[i] -= top
                    exp_shifted(row, bits)
                    part_l[b, h, c, g] = row.sum()
                else:
                    row[:] = 0.0
                    part_l[b, h, c, g] = 0.0
            for p in range(p_lo, p_hi):
                row0 = first[b, h, p]
                if size <= SHORT_RUN:
                    if p == p_lo:  # the V rows of the first runs were not touched by the K pass
                        for a in range(min(AHEAD, p_hi - p_lo)):
                            prefetch_rows(v, first[b, h, p_lo + a], size)
                    if p + AHEAD < p_hi:
                        prefetch_rows(v, first[b, h, p + AHEAD], size)
                for s in range(size if p < p_n - 1 else last):
                    i = (p - p_lo) * size + s
                    for g in range(g_n):
                        w = logits[g, i]
                        if w == 0.0:
                            continue
                        for j in range(d_n):
                            acc_o[g, j] += w * v[row0 + s, j]
            for g in range(g_n):
                for j in range(d_n):
                    part_o[b, h, c, g, j] = acc_o[g, j]

    return split


@cache
def _merge_kernel() -> Any:
    import numba

    @numba.njit(fastmath=FAST, cache=True, nogil=True)
    def merge(part_m, part_l, part_o, out):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # part_m, part_l (B, Hkv, T, G); part_o (B, Hkv, T, G, D); out (B, Hq, D), Hq = Hkv * G
        b_n, h_n, t_n, g_n = part_m.shape
        d_n = part_o.shape[4]
        for b in range(b_n):
            for h in range(h_n):
                for g in range(g_n):
                    top = part_m[b, h, 0, g]
                    for c in range(1, t_n):
                        top = max(top, part_m[b, h, c, g])
                    total = np.float32(0.0)
                    for j in range(d_n):
                        out[b, h * g_n + g, j] = 0.0
                    for c in range(t_n):  # at least one key is attended: top is finite
                        w = np.exp(part_m[b, h, c, g] - top) if part_m[b, h, c, g] > -np.inf else np.float32(0.0)
                        total += w * part_l[b, h, c, g]
                        for j in range(d_n):
                            out[b, h * g_n + g, j] += w * part_o[b, h, c, g, j]
                    for j in range(d_n):
                        out[b, h * g_n + g, j] /= total

    return merge


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first: torch.Tensor,
    size: int,
    last: int,
    scaling: float,
    mask: torch.Tensor | None = None,
    mask_offset: int = 0,
    own: int = -1,
) -> torch.Tensor:
    """Softmax attention of one decode query per sequence over runs of key rows, read in place.

    ``q (B, Hq, 1, D)``; ``k``, ``v`` ``(R, D)`` contiguous rows; ``first (B, Hkv, P)`` int64: the
    first row of each run, in key-position order; every run holds ``size`` keys but the last, which
    holds ``last`` (``1 <= last <= size``). Position ``x = p * size + s`` (key ``s`` of run ``p``) is
    left out where ``mask[b, h, mask_offset + x]`` (``(B, Hkv, M)`` bool) is False, except position
    ``own``, always attended. Every row must keep at least one key. Returns ``(B, 1, Hq, D)``.
    """
    b, hq, _, d = q.shape
    hkv, p = first.shape[1], first.shape[2]
    if not 1 <= last <= size or p < 1:
        raise ValueError(f"runs need 1 <= last <= size and at least one run, got last={last}, size={size}, {p} runs")
    if not (k.is_contiguous() and v.is_contiguous() and (mask is None or mask.is_contiguous())):
        raise ValueError("run_attention reads rows in place: pass contiguous k, v and mask")
    per_task = max(1, CHUNK // size)
    tasks = -(-p // per_task)
    g = hq // hkv
    part_m = np.empty((b, hkv, tasks, g), dtype=np.float32)  # numpy scratch: torch.empty costs ~2 us a call
    part_l = np.empty_like(part_m)
    part_o = np.empty((b, hkv, tasks, g, d), dtype=np.float32)
    _split_kernel()(
        q.reshape(b, hq, d).contiguous().numpy(),
        k.numpy(),
        v.numpy(),
        first.contiguous().numpy(),
        int(size),
        int(last),
        _NO_MASK if mask is None else mask.numpy(),
        int(mask_offset),
        int(own),
        float(scaling),
        per_task,
        part_m,
        part_l,
        part_o,
    )
    out = np.empty((b, hq, d), dtype=np.float32)
    _merge_kernel()(part_m, part_l, part_o, out)
    return torch.from_numpy(out).view(b, 1, hq, d)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    n: int,
    scaling: float,
    mask: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """:func:`run_attention` over keys ``[start, start + n)`` of contiguous buffers ``k``, ``v``
    ``(B, Hkv, N_cap, D)`` (runs of ``chunk`` keys). ``mask (B, Hkv, N_cap)`` bool, False for slots to
    leave out (padding), or None. The last slot, ``start + n - 1``, is the query's own key and is
    always attended (``causal_tail=1`` of :func:`~memfusion.kv.attention.grouped_attention`), so no
    row is empty. Returns ``(B, 1, Hq, D)``, the layout of ``grouped_attention``."""
    b, hkv, cap, d = k.shape
    if n < 1 or start < 0 or start + n > cap:
        raise ValueError(f"keys [{start}, {start + n}) are not inside a buffer of {cap} slots")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("decode_attention reads whole buffers: pass contiguous k and v")
    runs = -(-n // chunk)
    heads = np.arange(b * hkv, dtype=np.int64).reshape(b, hkv, 1) * cap  # (B, Hkv, 1): each head's row 0 (numpy:
    # a few us less per decode step than torch ops)
    first = torch.from_numpy(heads + start + np.arange(runs, dtype=np.int64) * chunk)  # (B, Hkv, runs)
    return run_attention(
        q, k.view(-1, d), v.view(-1, d), first, chunk, n - (runs - 1) * chunk, scaling, mask, start, n - 1
    )
