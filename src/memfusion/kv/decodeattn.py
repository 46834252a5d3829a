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
and unnormalised output; the same call then merges the tasks exactly
(``sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c``). Every K/V byte is read from memory once,
which is what the K/V read rate of ``memfusion bench --suite kv`` measures against the machine's
STREAM copy bandwidth. :func:`decode_attention` is the one-run case.

This module holds the Python side (argument checks, numpy views: a decode step calls it once per
layer, so each torch call it avoids counts); the compiled code is in :mod:`.jitkernels`, one kernel
per (query heads per KV head, head dim), compiled on first use (seconds; ``cache=True`` keeps the
machine code between processes). It serves float32 CPU tensors (:func:`serves`); other dtypes and
CUDA take the torch paths.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from memfusion.kv.kernels import serves

__all__ = ["CHUNK", "decode_attention", "decode_rows", "run_attention", "run_rows", "serves"]

_NO_MASK = np.zeros((0, 0, 0), dtype=np.bool_)
"""The kernels' "no mask" argument (an empty array keeps one compiled signature)."""
_NO_BOUNDS = np.zeros((0, 0, 0, 0), dtype=np.uint16)
_NO_SELECTION = np.zeros((0, 0, 0), dtype=np.int64)
"""The kernel's page-selection arguments when the runs are given (``select`` of :func:`run_rows`); the
bounds typed as quest's default (bfloat16 bit patterns), so that dense and quest share one compiled kernel."""

CHUNK = 512
"""Keys per task: the ``(G, CHUNK)`` logits of a task stay in L1 (8 KiB for G = 4), and a 32K
context gives 64 tasks per KV head, plenty to balance two cores."""


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
    return run_rows(q, k.numpy(), v.numpy(), first.contiguous().numpy(), size, last, scaling, mask, mask_offset, own)


def run_rows(
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
    select: tuple[np.ndarray, np.ndarray, int, int, np.ndarray] | None = None,
) -> torch.Tensor:
    """:func:`run_attention` with ``k``, ``v`` ``(R, D)`` and ``first`` as numpy arrays (C-contiguous,
    not checked), for callers that hold numpy views of their buffers: a decode step calls this once
    per layer, and each torch call it saves costs 5-15 us between the step's matmuls.

    ``select = (kmin, kmax, pages, cap, sel)``: quest's page selection runs first in the same call
    (see :func:`memfusion.kv.pageattn.select_and_attend`) and fills ``first`` and ``sel``."""
    b, hq, _, d = q.shape
    hkv, p = first.shape[1], first.shape[2]
    if not 1 <= last <= size or p < 1:
        raise ValueError(f"runs need 1 <= last <= size and at least one run, got last={last}, size={size}, {p} runs")
    per_task = max(1, CHUNK // size)
    out = np.empty((b, 1, hq, d), dtype=np.float32)  # numpy: torch.empty costs ~2 us a call
    from memfusion.kv.jitkernels import attention_kernel  # numba: imported on first use

    attention_kernel(hq // hkv, d)(
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
        *((_NO_BOUNDS, _NO_BOUNDS, 0, 0, _NO_SELECTION) if select is None else select),
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
    cap = k.shape[2]
    if n < 1 or start < 0 or start + n > cap:
        raise ValueError(f"keys [{start}, {start + n}) are not inside a buffer of {cap} slots")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("decode_attention reads whole buffers: pass contiguous k and v")
    return decode_rows(q, k.numpy(), v.numpy(), start, n, scaling, mask, chunk)


def decode_rows(
    q: torch.Tensor,
    k: np.ndarray,
    v: np.ndarray,
    start: int,
    n: int,
    scaling: float,
    mask: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """:func:`decode_attention` on numpy buffers ``k``, ``v`` ``(B, Hkv, N_cap, D)`` (C-contiguous, and
    ``[start, start + n)`` inside them: not checked), for a caller that keeps numpy views of its
    buffers (:class:`~memfusion.kv.policy.TokenStore`): no torch call to reach them."""
    b, hkv, cap, d = k.shape
    runs = -(-n // chunk)
    first = _whole_runs(b, hkv, cap, start, runs, chunk)
    rows_k, rows_v = k.reshape(-1, d), v.reshape(-1, d)
    return run_rows(q, rows_k, rows_v, first, chunk, n - (runs - 1) * chunk, scaling, mask, start, n - 1)
