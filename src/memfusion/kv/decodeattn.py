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

from functools import cache, lru_cache
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
def _kernel(g_n: int, d_n: int) -> Any:
    """The attention kernel for ``g_n`` query heads per KV head and head dim ``d_n``: both are
    compile-time constants (cell contents key numba's cache), so the dot products unroll over the
    head dim and keep their accumulators in registers: about 1.5x fewer cycles per key than loops
    over runtime sizes. ``kernel(q, k, v, first, size, last, mask, mask_offset, own, scaling,
    per_task, tasks, out)``, shapes in the body."""
    import numba

    exp_shifted = exp_kernel()
    prefetch_rows = prefetch_kernel()
    G, D = g_n, d_n

    @numba.njit(fastmath=FAST, cache=True, nogil=True)
    def dots(qs, k, r, n, logits, i):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # logits[:, i : i + n] = qs (G, D) @ k[r : r + n].T, in blocks of 4 keys x 2 query heads
        # (8 independent sums: each K and q row loaded once per block)
        s = 0
        while s + 4 <= n:
            a, b = r + s, i + s
            g = 0
            while g + 2 <= G:
                x0 = x1 = x2 = x3 = y0 = y1 = y2 = y3 = np.float32(0.0)
                for j in range(D):
                    q0, q1 = qs[g, j], qs[g + 1, j]
                    k0, k1, k2, k3 = k[a, j], k[a + 1, j], k[a + 2, j], k[a + 3, j]
                    x0 += q0 * k0
                    x1 += q0 * k1
                    x2 += q0 * k2
                    x3 += q0 * k3
                    y0 += q1 * k0
                    y1 += q1 * k1
                    y2 += q1 * k2
                    y3 += q1 * k3
                logits[g, b], logits[g, b + 1], logits[g, b + 2], logits[g, b + 3] = x0, x1, x2, x3
                logits[g + 1, b], logits[g + 1, b + 1], logits[g + 1, b + 2], logits[g + 1, b + 3] = y0, y1, y2, y3
                g += 2
            if g < G:  # odd G: the last head alone
                x0 = x1 = x2 = x3 = np.float32(0.0)
                for j in range(D):
                    q0 = qs[g, j]
                    x0 += q0 * k[a, j]
                    x1 += q0 * k[a + 1, j]
                    x2 += q0 * k[a + 2, j]
                    x3 += q0 * k[a + 3, j]
                logits[g, b], logits[g, b + 1], logits[g, b + 2], logits[g, b + 3] = x0, x1, x2, x3
            s += 4
        while s < n:
            for g in range(G):
                x0 = np.float32(0.0)
                for j in range(D):
                    x0 += qs[g, j] * k[r + s, j]
                logits[g, i + s] = x0
            s += 1

    @numba.njit(fastmath=FAST, cache=True, nogil=True)
    def weigh(logits, i, v, r, n, acc):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # acc (G, D) += logits[:, i : i + n] @ v[r : r + n], 4 keys per pass over a head's accumulator
        s = 0
        while s + 4 <= n:
            a, b = r + s, i + s
            for g in range(G):
                w0, w1, w2, w3 = logits[g, b], logits[g, b + 1], logits[g, b + 2], logits[g, b + 3]
                for j in range(D):
                    acc[g, j] += (w0 * v[a, j] + w1 * v[a + 1, j]) + (w2 * v[a + 2, j] + w3 * v[a + 3, j])
            s += 4
        while s < n:
            for g in range(G):
                w0 = logits[g, i + s]
                for j in range(D):
                    acc[g, j] += w0 * v[r + s, j]
            s += 1

    @numba.njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
    def attention(q, k, v, first, size, last, mask, mask_offset, own, scaling, per_task, tasks, out):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # q (B, Hq, D); k, v (R, D) contiguous rows; first (B, Hkv, P): the first row of each run, the
        # runs of a (b, h) in key-position order: run p holds positions [p*size, p*size + size), the
        # last run only ``last`` of them; position ``own`` (or -1) is always attended; mask
        # (B, Hkv, M) bool or (0, 0, 0): position x is left out where mask[b, h, mask_offset + x] is False;
        # task (b, h, c), c < tasks, reads runs [c*per_task, (c+1)*per_task) and leaves part_m, part_l
        # (B, Hkv, T, G) (max logit, sum of exp) and part_o (B, Hkv, T, G, D) (unnormalised output);
        # then the tasks of each (b, h) merge into out (B, Hq, D)
        b_n = q.shape[0]
        h_n, p_n = first.shape[1], first.shape[2]
        masked = mask.shape[0] > 0
        part_m = np.empty((b_n, h_n, tasks, G), dtype=np.float32)
        part_l = np.empty((b_n, h_n, tasks, G), dtype=np.float32)
        part_o = np.empty((b_n, h_n, tasks, G, D), dtype=np.float32)
        for t in numba.prange(b_n * h_n * tasks):
            b = t // (h_n * tasks)
            h = (t // tasks) % h_n
            c = t % tasks
            p_lo = c * per_task
            p_hi = min(p_lo + per_task, p_n)
            count = (p_hi - p_lo - 1) * size + (size if p_hi < p_n else last)
            qs = np.empty((G, D), dtype=np.float32)
            for g in range(G):
                for j in range(D):
                    qs[g, j] = q[b, h * G + g, j] * scaling
            logits = np.empty((G, count), dtype=np.float32)
            for p in range(p_lo, p_hi):
                if size <= SHORT_RUN and p + AHEAD < p_hi:  # short runs: fetch a later run's rows meanwhile
                    prefetch_rows(k, first[b, h, p + AHEAD], size)
                dots(qs, k, first[b, h, p], size if p < p_n - 1 else last, logits, (p - p_lo) * size)
            if masked:
                for i in range(count):
                    pos = p_lo * size + i
                    if pos != own and not mask[b, h, mask_offset + pos]:
                        for g in range(G):
                            logits[g, i] = -np.inf
            bits = np.empty(count, dtype=np.int32)
            for g in range(G):
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
            acc = np.zeros((G, D), dtype=np.float32)
            for p in range(p_lo, p_hi):
                if size <= SHORT_RUN:
                    if p == p_lo:  # the V rows of the first runs were not touched by the K pass
                        for a in range(min(AHEAD, p_hi - p_lo)):
                            prefetch_rows(v, first[b, h, p_lo + a], size)
                    if p + AHEAD < p_hi:
                        prefetch_rows(v, first[b, h, p + AHEAD], size)
                weigh(logits, (p - p_lo) * size, v, first[b, h, p], size if p < p_n - 1 else last, acc)
            part_o[b, h, c] = acc
        for b in range(b_n):  # merge: sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c
            for h in range(h_n):
                for g in range(G):
                    top = part_m[b, h, 0, g]
                    for c in range(1, tasks):
                        top = max(top, part_m[b, h, c, g])
                    total = np.float32(0.0)
                    for j in range(D):  # loops, not slice assignments: outside prange those are parallel regions
                        out[b, h * G + g, j] = 0.0
                    for c in range(tasks):  # at least one key is attended: top is finite
                        w = np.exp(part_m[b, h, c, g] - top) if part_m[b, h, c, g] > -np.inf else np.float32(0.0)
                        total += w * part_l[b, h, c, g]
                        for j in range(D):
                            out[b, h * G + g, j] += w * part_o[b, h, c, g, j]
                    for j in range(D):
                        out[b, h * G + g, j] /= total

    return attention


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
    if not (k.is_contiguous() and v.is_contiguous() and (mask is None or mask.is_contiguous())):
        raise ValueError("run_attention reads rows in place: pass contiguous k, v and mask")
    return _run(q, k.numpy(), v.numpy(), first.contiguous().numpy(), size, last, scaling, mask, mask_offset, own)


def _run(
    q: torch.Tensor,
    k: np.ndarray,
    v: np.ndarray,
    first: np.ndarray,
    size: int,
    last: int,
    scaling: float,
    mask: torch.Tensor | None,
    mask_offset: int,
    own: int,
) -> torch.Tensor:
    # run_attention on numpy k, v, first: a decode step calls this once per layer, and each torch
    # call it saves (view, numpy, from_numpy: ~1 us apiece) is a few percent of a 4K step's attention
    b, hq, _, d = q.shape
    hkv, p = first.shape[1], first.shape[2]
    if not 1 <= last <= size or p < 1:
        raise ValueError(f"runs need 1 <= last <= size and at least one run, got last={last}, size={size}, {p} runs")
    per_task = max(1, CHUNK // size)
    out = np.empty((b, 1, hq, d), dtype=np.float32)  # numpy: torch.empty costs ~2 us a call
    _kernel(hq // hkv, d)(
        np.ascontiguousarray(q.numpy().reshape(b, hq, d)),
        k,
        v,
        first,
        int(size),
        int(last),
        _NO_MASK if mask is None else mask.numpy(),
        int(mask_offset),
        int(own),
        float(scaling),
        per_task,
        -(-p // per_task),
        out.reshape(b, hq, d),
    )
    return torch.from_numpy(out)


@lru_cache(maxsize=64)
def _whole_runs(b: int, hkv: int, cap: int, start: int, runs: int, chunk: int) -> np.ndarray:
    """``first`` for keys from ``start`` of each head's buffer of ``cap`` rows, in runs of ``chunk``:
    ``(B, Hkv, runs)``. Cached: a decode step asks for the same runs as the step before (the run
    count changes once per ``chunk`` tokens). The kernel only reads it."""
    heads = np.arange(b * hkv, dtype=np.int64).reshape(b, hkv, 1) * cap  # each head's row 0
    return heads + start + np.arange(runs, dtype=np.int64) * chunk


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
    first = _whole_runs(b, hkv, cap, start, runs, chunk)
    kn, vn = k.numpy().reshape(-1, d), v.numpy().reshape(-1, d)
    return _run(q, kn, vn, first, chunk, n - (runs - 1) * chunk, scaling, mask, start, n - 1)
