"""Dense decode attention on the CPU: one numba split-K kernel (flash-decoding) over keys in place.

A decode step of ``dense`` / ``window`` / ``paged`` attends one query per sequence to ``n``
resident keys that lie contiguously in the layer's buffer. The torch path (``k @ q^T``, softmax,
``probs @ v``) runs three ops, writes the ``(G, n)`` logits and probabilities to memory and back,
and parallelises each op on its own. :func:`decode_attention` instead splits the keys of every
(sequence, KV head) into chunks of ``chunk`` tokens, one task each (``parallel`` over all of
them, so two KV heads still keep every core busy): a task reads its K rows once (the logits of
the head's ``G`` query heads, kept in an L1-sized buffer), its V rows once (the weighted sum),
and leaves the chunk's max logit, softmax denominator and unnormalised output; a second kernel
merges the chunks exactly (``sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c``). Every K/V byte
is read from memory once, which is what the K/V read rate of ``memfusion bench --suite kv``
measures against the machine's STREAM copy bandwidth.

The kernels compile on first use (a few seconds; ``cache=True`` keeps the machine code between
processes) and serve float32 CPU tensors (:func:`serves`); other dtypes and CUDA take the torch
path of :func:`memfusion.kv.attention.grouped_attention`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from memfusion.kv.kernels import FAST, available, exp_kernel

_NO_MASK = torch.zeros(0, 0, 0, dtype=torch.bool).numpy()
"""The kernels' "no mask" argument (an empty array keeps one compiled signature)."""

CHUNK = 512
"""Keys per task: the ``(G, CHUNK)`` logits of a task stay in L1 (8 KiB for G = 4), and a 32K
context gives 64 tasks per KV head, plenty to balance two cores."""


@cache
def _split_kernel() -> Any:
    import numba
    import numpy as np

    exp_shifted = exp_kernel()

    @numba.njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
    def split(q, k, v, start, n, mask, scaling, chunk, part_m, part_l, part_o):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # q (B, Hq, D); k, v (B, Hkv, N_cap, D) contiguous; the keys are slots [start, start + n),
        # slot start + n - 1 (the query's own) always attended; mask (B, Hkv, N_cap) bool or (0, 0, 0);
        # out per task (b, h, c): part_m, part_l (B, Hkv, P, G) max logit, sum of exp; part_o (B, Hkv, P, G, D)
        b_n, hq, d_n = q.shape
        h_n = k.shape[1]
        g_n = hq // h_n
        p_n = part_m.shape[2]
        masked = mask.shape[0] > 0
        own = start + n - 1
        for t in numba.prange(b_n * h_n * p_n):
            b = t // (h_n * p_n)
            h = (t // p_n) % h_n
            c = t % p_n
            lo = start + c * chunk
            hi = min(lo + chunk, start + n)
            qs = np.empty((g_n, d_n), dtype=np.float32)
            for g in range(g_n):
                for j in range(d_n):
                    qs[g, j] = q[b, h * g_n + g, j] * scaling
            logits = np.empty((g_n, hi - lo), dtype=np.float32)
            for s in range(lo, hi):
                if masked and not mask[b, h, s] and s != own:
                    for g in range(g_n):
                        logits[g, s - lo] = -np.inf
                    continue
                for g in range(g_n):
                    acc = np.float32(0.0)
                    for j in range(d_n):
                        acc += qs[g, j] * k[b, h, s, j]
                    logits[g, s - lo] = acc
            acc_o = np.zeros((g_n, d_n), dtype=np.float32)
            bits = np.empty(hi - lo, dtype=np.int32)
            for g in range(g_n):
                row = logits[g]
                top = row.max()
                part_m[b, h, c, g] = top
                if top > -np.inf:
                    for i in range(hi - lo):
                        row[i] -= top
                    exp_shifted(row, bits)
                    part_l[b, h, c, g] = row.sum()
                else:
                    row[:] = 0.0
                    part_l[b, h, c, g] = 0.0
            for s in range(lo, hi):
                for g in range(g_n):
                    w = logits[g, s - lo]
                    if w == 0.0:
                        continue
                    for j in range(d_n):
                        acc_o[g, j] += w * v[b, h, s, j]
            for g in range(g_n):
                for j in range(d_n):
                    part_o[b, h, c, g, j] = acc_o[g, j]

    return split


@cache
def _merge_kernel() -> Any:
    import numba
    import numpy as np

    @numba.njit(fastmath=FAST, cache=True, nogil=True)
    def merge(part_m, part_l, part_o, out):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        # part_m, part_l (B, Hkv, P, G); part_o (B, Hkv, P, G, D); out (B, Hq, D), Hq = Hkv * G
        b_n, h_n, p_n, g_n = part_m.shape
        d_n = part_o.shape[4]
        for b in range(b_n):
            for h in range(h_n):
                for g in range(g_n):
                    top = part_m[b, h, 0, g]
                    for c in range(1, p_n):
                        top = max(top, part_m[b, h, c, g])
                    total = np.float32(0.0)
                    for j in range(d_n):
                        out[b, h * g_n + g, j] = 0.0
                    for c in range(p_n):  # the own key is always attended: top is finite
                        w = np.exp(part_m[b, h, c, g] - top) if part_m[b, h, c, g] > -np.inf else np.float32(0.0)
                        total += w * part_l[b, h, c, g]
                        for j in range(d_n):
                            out[b, h * g_n + g, j] += w * part_o[b, h, c, g, j]
                    for j in range(d_n):
                        out[b, h * g_n + g, j] /= total

    return merge


def serves(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The kernel handles these tensors: float32 on the CPU, numba installed."""
    return q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and available()


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
    """Softmax attention of one decode query per sequence over keys ``[start, start + n)`` in place.

    ``q (B, Hq, 1, D)``; ``k``, ``v`` ``(B, Hkv, N_cap, D)`` contiguous buffers (only the slots
    ``[start, start + n)`` are read); ``mask (B, Hkv, N_cap)`` bool, False for slots to leave out
    (padding), or None. The last slot, ``start + n - 1``, is the query's own key and is always
    attended (``causal_tail=1`` of :func:`~memfusion.kv.attention.grouped_attention`), so no row is
    empty. Returns ``(B, 1, Hq, D)``, the layout of ``grouped_attention``.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    if n < 1 or start < 0 or start + n > k.shape[2]:
        raise ValueError(f"keys [{start}, {start + n}) are not inside a buffer of {k.shape[2]} slots")
    if not (k.is_contiguous() and v.is_contiguous() and (mask is None or mask.is_contiguous())):
        raise ValueError("decode_attention reads whole buffers: pass contiguous k, v and mask")
    import numpy as np  # scratch in numpy: torch.empty costs ~2 us a call, several % of a 4K step

    g = hq // hkv
    parts = -(-n // chunk)
    part_m = np.empty((b, hkv, parts, g), dtype=np.float32)
    part_l = np.empty_like(part_m)
    part_o = np.empty((b, hkv, parts, g, d), dtype=np.float32)
    _split_kernel()(
        q.reshape(b, hq, d).contiguous().numpy(),
        k.numpy(),
        v.numpy(),
        int(start),
        int(n),
        _NO_MASK if mask is None else mask.numpy(),
        float(scaling),
        int(chunk),
        part_m,
        part_l,
        part_o,
    )
    out = np.empty((b, hq, d), dtype=np.float32)
    _merge_kernel()(part_m, part_l, part_o, out)
    return torch.from_numpy(out).view(b, 1, hq, d)
