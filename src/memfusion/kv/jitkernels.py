"""memfusion's compiled decode attention (numba): the split-K kernel over runs of key rows and what
it calls - the blocked dot products and weighted sums, a vectorisable ``exp``, a software prefetch -
quest's page selection, and the decode steps' token appends (dense's store, quest's pages).

numba is imported with this module: :mod:`memfusion.kv.decodeattn` imports it on a kernel's first
use, so ``import memfusion.kv`` stays light. Everything a kernel calls is a module global here and
:func:`attention_kernel`'s per-shape kernels close over ints only. numba keys its on-disk cache
(``cache=True``) on a hash of the kernel's closure; a closure that held a compiled function (whose
pickle carries a per-process id) missed that cache in every new process - it recompiled for ~10 s
and left one more file in ``__pycache__`` each time. With the callees in this file, editing them also
invalidates the cached kernels (the cache is stamped with the kernel's source file).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numba
import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from memfusion.kv.kernels import ALL_PAGES, FAST

AHEAD_ROWS = 12
"""The kernels prefetch the rows this far ahead of the ones they read, as they go (3 KiB at head dim 64),
past the end of a run into the task's next run (quest's 16-row pages: the next selected page)."""

_PREFETCH = "llvm.prefetch.p0" if binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"
"""``llvm.prefetch``'s name carries its pointer type: opaque ``ptr`` from LLVM 15 on, ``i8*`` before."""


@numba.njit(fastmath=FAST, cache=True, nogil=True)
def exp_shifted(x, bits):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # x (n,) float32 logits minus their max (<= 0, or -inf for a masked key) -> exp(x) in place,
    # exactly 0 for -inf; bits (n,) int32 scratch. libm's expf is a call per element (numba's
    # llvmlite has no SVML); this is branch-free so both loops vectorise: exp(x) = 2^m * 2^f with
    # t = x log2(e), m = round(t), f = t - m in [-1/2, 1/2], 2^f by its degree-7 Taylor polynomial
    # (truncation < 1e-8), 2^m written as float bits. t is clamped at -126 (2^-126 ~ 1.2e-38, so
    # weights below that are not subnormal but still negligible against the max's weight 1).
    # Max relative error 3.5e-6, from t's float32 rounding at t ~ -126; ~1e-7 for t > -1.
    scale = bits.view(np.float32)
    for i in range(x.shape[0]):
        xi = x[i]
        t = max(xi * np.float32(1.4426950408889634), np.float32(-126.0))
        m = np.floor(t + np.float32(0.5))
        f = t - m
        p = np.float32(1.5252733804059840e-05)  # ln(2)^k / k!, k = 7 .. 0
        p = p * f + np.float32(1.5403530393381608e-04)
        p = p * f + np.float32(1.3333558146428443e-03)
        p = p * f + np.float32(9.6181291076284770e-03)
        p = p * f + np.float32(5.5504108664821580e-02)
        p = p * f + np.float32(2.4022650695910071e-01)
        p = p * f + np.float32(6.9314718055994531e-01)
        p = p * f + np.float32(1.0)
        x[i] = p if xi > -np.inf else np.float32(0.0)
        bits[i] = (np.int32(m) + np.int32(127)) << np.int32(23)  # the float 2^m
    for i in range(x.shape[0]):
        x[i] *= scale[i]


@intrinsic
def _prefetch_line(typingctx, arr, row, col):  # type: ignore[no-untyped-def]
    """``prefetch_line(a, row, col)``: hint the CPU to fetch the 64-byte line holding ``a[row, col]``
    (C-contiguous 2-D ``a``; no bounds check, none needed: a prefetch never faults) through
    ``llvm.prefetch`` (read, high locality, data cache). With ``col`` a compile-time constant, a row's
    prefetches are straight-line code."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        stride = cgutils.unpack_tuple(builder, ary.strides)[0]
        item = context.get_constant(types.intp, aryty.dtype.bitwidth // 8)
        offset = builder.add(builder.mul(args[1], stride), builder.mul(args[2], item))
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        signature_ir = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, signature_ir, _PREFETCH)
        address = builder.inttoptr(builder.add(builder.ptrtoint(ary.data, ir.IntType(64)), offset), i8p)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp, types.intp), codegen


prefetch_line: Any = _prefetch_line  # called from the kernels as prefetch_line(a, row, col)


@intrinsic
def _float_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bit pattern is ``bits`` (uint32)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_float(typingctx, x):  # type: ignore[no-untyped-def]
    """The bit pattern (uint32) of the float32 ``x``."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


float_of_bits: Any = _float_bits  # called from the kernels as float_of_bits(u32)
bits_of_float: Any = _bits_float  # called from the kernels as bits_of_float(f32)


def widen(x: Any) -> Any:  # pragma: no cover (typed by the overload below, for compiled callers only)
    """A stored page bound as a float32: float bounds as they are, a bfloat16 bit pattern (uint16) widened
    (exactly: bfloat16 is float32 without its low 16 mantissa bits)."""
    raise NotImplementedError("widen is for compiled kernels")


def widened(old: Any, x: Any, up: bool) -> Any:  # pragma: no cover (typed by the overload below)
    """A page's stored bound element widened by the key element ``x`` (float32): ``kmax`` (``up``)
    or ``kmin``; bfloat16 patterns take ``x`` rounded outward."""
    raise NotImplementedError("widened is for compiled kernels")


@numba.njit(cache=True, nogil=True)
def bf16_outward(x, up):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # the bfloat16 bit pattern (uint16) of the nearest bfloat16 >= x (up) or <= x (not up), for a
    # float32 x that is not NaN. Dropping the low 16 bits rounds toward zero, which is already the
    # wanted direction for negative x going up and positive x going down; otherwise one step of the
    # pattern away from zero (the largest finite float goes to inf, still a bound)
    bits = bits_of_float(np.float32(x))
    t = bits >> np.uint32(16)
    if (bits & np.uint32(0xFFFF)) != 0 and ((x > 0) if up else (x < 0)):
        t += np.uint32(1)
    return np.uint16(t)


@overload(widen)
def _widen(x):  # type: ignore[no-untyped-def]
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:
        return lambda x: float_of_bits(np.uint32(x) << np.uint32(16))
    return None


@overload(widened)
def _widened(old, x, up):  # type: ignore[no-untyped-def]
    if isinstance(old, types.Float):
        return lambda old, x, up: max(old, x) if up else min(old, x)

    def rounded(old, x, up):  # type: ignore[no-untyped-def]
        r = bf16_outward(x, up)
        return r if (widen(r) > widen(old) if up else widen(r) < widen(old)) else old

    return rounded if old == types.uint16 else None


@numba.njit(fastmath=FAST, cache=True, nogil=True)
def fetch_ahead(x, r, s, n, nxt, ahead, D):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # prefetch the 4 rows ``ahead`` after row s of the run x[r : r + n] in the order the task reads
    # them: past the run's end into the next run, from row nxt (-1: none, straight on). For the loops
    # below (4 rows a block): the hardware prefetchers alone leave a core's loads waiting on memory,
    # so reading and computing take their sum, not their max (see kv_decode_breakdown.py --prefetch).
    # ahead = 0: none
    if ahead > 0:
        t = s + ahead
        fetch_four(x, r + t if t < n or nxt < 0 else nxt + t - n, D)


@numba.njit(fastmath=FAST, cache=True, nogil=True)
def fetch_four(x, r, D):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # prefetch rows [r, r + 4) of x, a line (16 float32 columns) at a time
    for z in range(4):
        for c in range(0, D, 16):
            prefetch_line(x, r + z, c)


@numba.njit(fastmath=FAST, cache=True, nogil=True)
def dots(qs, k, r, n, logits, i, G, D, ahead, nxt):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # logits[:, i : i + n] = qs (G, D) @ k[r : r + n].T, in blocks of 4 keys x 2 query heads
    # (8 independent sums: each K and q row loaded once per block). G and D are the calling
    # kernel's compile-time constants: LLVM inlines this call and unrolls over them. ahead, nxt: see fetch_ahead
    s = 0
    while s + 4 <= n:
        a, b = r + s, i + s
        fetch_ahead(k, r, s, n, nxt, ahead, D)
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
def weigh(logits, i, v, r, n, acc, G, D, ahead, nxt):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # acc (G, D) += logits[:, i : i + n] @ v[r : r + n], in blocks of 4 keys x 2 heads (each V row
    # loaded once per pair of heads, not once per head). ahead, nxt: see fetch_ahead
    s = 0
    while s + 4 <= n:
        a, b = r + s, i + s
        fetch_ahead(v, r, s, n, nxt, ahead, D)
        g = 0
        while g + 2 <= G:
            w0, w1, w2, w3 = logits[g, b], logits[g, b + 1], logits[g, b + 2], logits[g, b + 3]
            u0, u1, u2, u3 = logits[g + 1, b], logits[g + 1, b + 1], logits[g + 1, b + 2], logits[g + 1, b + 3]
            for j in range(D):
                v0, v1, v2, v3 = v[a, j], v[a + 1, j], v[a + 2, j], v[a + 3, j]
                acc[g, j] += (w0 * v0 + w1 * v1) + (w2 * v2 + w3 * v3)
                acc[g + 1, j] += (u0 * v0 + u1 * v1) + (u2 * v2 + u3 * v3)
            g += 2
        if g < G:  # odd G: the last head alone
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


@numba.njit(fastmath=FAST, cache=True, nogil=True)
def select_one(q, kmin, kmax, nonempty, padded, pages, sel, b, h):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # Quest's selection for sequence b, KV head h: q (B, Hq, D); kmin, kmax (B, Hkv, C, D) float32 or
    # bfloat16 bit patterns (uint16, see widen); nonempty
    # (B, C) bool, read only when padded; candidates: pages [0, pages); writes sel[b, h] (keep + 1):
    # the keep candidates with the largest bound in ascending order, then page ``pages`` (the current one)
    d_n = q.shape[2]
    h_n = kmin.shape[1]
    g_n = q.shape[1] // h_n
    keep = sel.shape[2] - 1
    q_pos = np.zeros(d_n, dtype=np.float32)
    q_neg = np.zeros(d_n, dtype=np.float32)
    for g in range(g_n):
        for j in range(d_n):
            x = q[b, h * g_n + g, j]
            if x > 0:
                q_pos[j] += x
            else:
                q_neg[j] += x
    bound = np.empty(pages, dtype=np.float32)
    p = 0
    while p + 4 <= pages:  # 4 pages a block: 4 independent sums, q_pos / q_neg loaded once per block
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for j in range(d_n):
            qp, qn = q_pos[j], q_neg[j]
            a0 += qp * widen(kmax[b, h, p, j]) + qn * widen(kmin[b, h, p, j])
            a1 += qp * widen(kmax[b, h, p + 1, j]) + qn * widen(kmin[b, h, p + 1, j])
            a2 += qp * widen(kmax[b, h, p + 2, j]) + qn * widen(kmin[b, h, p + 2, j])
            a3 += qp * widen(kmax[b, h, p + 3, j]) + qn * widen(kmin[b, h, p + 3, j])
        bound[p], bound[p + 1], bound[p + 2], bound[p + 3] = a0, a1, a2, a3
        p += 4
    while p < pages:
        acc = np.float32(0.0)
        for j in range(d_n):
            acc += q_pos[j] * widen(kmax[b, h, p, j]) + q_neg[j] * widen(kmin[b, h, p, j])
        bound[p] = acc
        p += 1
    if padded:
        for p in range(pages):
            if not nonempty[b, p]:
                bound[p] = -np.inf
    c = 0
    taken = np.zeros(pages, dtype=np.bool_)
    if keep > 0:
        cut = np.partition(bound, pages - keep)[pages - keep]  # the keep-th largest bound
        ties = keep
        for p in range(pages):
            if bound[p] > cut:
                ties -= 1
        for p in range(pages):  # ascending page order: memory is read forwards
            if c < keep and (bound[p] > cut or (bound[p] == cut and ties > 0)):
                if bound[p] == cut:
                    ties -= 1
                sel[b, h, c] = p
                taken[p] = True
                c += 1
    p = 0
    while c < keep:  # only with NaN bounds (they compare false): the first pages left, never out of range
        if not taken[p]:
            sel[b, h, c] = p
            c += 1
        p += 1
    sel[b, h, keep] = pages


@numba.njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
def select_kernel(q, kmin, kmax, nonempty, padded, pages, sel):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # select_one for every (sequence, KV head), over the cores
    h_n = kmin.shape[1]
    for bh in numba.prange(q.shape[0] * h_n):
        select_one(q, kmin, kmax, nonempty, padded, pages, sel, bh // h_n, bh % h_n)


@cache
def attention_kernel(g_n: int, d_n: int, ahead_rows: int = AHEAD_ROWS) -> Any:
    """The attention kernel for ``g_n`` query heads per KV head and head dim ``d_n``, both
    compile-time constants (ints in the closure, so they key numba's cache): the dot products unroll
    over the head dim and keep their accumulators in registers, ~1.5x fewer cycles per key than
    loops over runtime sizes (201 -> 123 us for 4K keys x 2 KV heads, 4 query heads each, in L3).
    ``kernel(q, k, v, first, size, last, mask, mask_offset, own, scaling, per_task, tasks, out, kmin, kmax,
    pages, cap, sel)``, shapes in the body. ``ahead_rows``: the prefetch distance (0: none, for the
    A/B of ``benchmarks/kv_decode_breakdown.py --prefetch``)."""
    G, D, A = g_n, d_n, ahead_rows

    @numba.njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
    def attention(  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        q, k, v, first, size, last, mask, mask_offset, own, scaling, per_task, tasks, out, kmin, kmax, pages, cap, sel
    ):
        # q (B, Hq, D); k, v (R, D) contiguous rows; first (B, Hkv, P): the first row of each run, the
        # runs of a (b, h) in key-position order: run p holds positions [p*size, p*size + size), the
        # last run only ``last`` of them; position ``own`` (or -1) is always attended; mask
        # (B, Hkv, M) bool or (0, 0, 0): position x is left out where mask[b, h, mask_offset + x] is False;
        # task (b, h, c), c < tasks, reads runs [c*per_task, (c+1)*per_task) and leaves part_m, part_l
        # (B, Hkv, T, G) (max logit, sum of exp) and part_o (B, Hkv, T, G, D) (unnormalised output);
        # then the tasks of each (b, h) merge into out (B, Hq, D). With pages > 0 (quest) the runs are
        # selected first, in the same call: select_one over kmin, kmax (B, Hkv, C, D) into sel
        # (B, Hkv, P), and run i of (b, h) is page sel[b, h, i] of a page-major buffer of cap pages
        # per head (first is filled); pages == 0 skips that (kmin, kmax, sel may be empty)
        b_n = q.shape[0]
        h_n, p_n = first.shape[1], first.shape[2]
        if pages > 0:
            for bh in numba.prange(b_n * h_n):
                b, h = bh // h_n, bh % h_n
                select_one(q, kmin, kmax, ALL_PAGES, False, pages, sel, b, h)
                for i in range(p_n):
                    first[b, h, i] = (bh * cap + sel[b, h, i]) * size
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
                n_p = size if p < p_n - 1 else last
                nxt = first[b, h, p + 1] if p + 1 < p_hi else -1
                dots(qs, k, first[b, h, p], n_p, logits, (p - p_lo) * size, G, D, A, nxt)
            if masked:
                for i in range(count):
                    pos = p_lo * size + i
                    if pos != own and not mask[b, h, mask_offset + pos]:
                        for g in range(G):
                            logits[g, i] = -np.inf
            nxt = first[b, h, p_lo + 1] if p_lo + 1 < p_hi else -1
            for s in range(0, A, 4):  # the first V rows, not touched yet, come in meanwhile
                fetch_ahead(v, first[b, h, p_lo], s - A, size, nxt, A, D)
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
                n_p = size if p < p_n - 1 else last
                nxt = first[b, h, p + 1] if p + 1 < p_hi else -1
                weigh(logits, (p - p_lo) * size, v, first[b, h, p], n_p, acc, G, D, A, nxt)
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


@numba.njit(cache=True, nogil=True)
def store_page_token(k_buf, v_buf, kmin, kmax, valid, nonempty, k, v, ok, page, slot):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # quest's decode append: k_buf, v_buf (B, Hkv, C, S, D); kmin, kmax (B, Hkv, C, D) as select_one reads
    # them (bfloat16 patterns are rounded outward: widened); valid (B, C, S); nonempty (B, C);
    # k, v (B, Hkv, 1, D); ok (B, 1) bool: one token per sequence, written at (page, slot); a real one
    # (ok) widens its page's bounds, a padding one is only marked not valid. True if every row is real.
    b_n, h_n, d_n = k.shape[0], k.shape[1], k.shape[3]
    real = True
    for b in range(b_n):
        valid[b, page, slot] = ok[b, 0]
        if ok[b, 0]:
            nonempty[b, page] = True
        else:
            real = False
        for h in range(h_n):
            for j in range(d_n):
                x = k[b, h, 0, j]
                k_buf[b, h, page, slot, j] = x
                v_buf[b, h, page, slot, j] = v[b, h, 0, j]
                if ok[b, 0]:
                    kmin[b, h, page, j] = widened(kmin[b, h, page, j], x, False)
                    kmax[b, h, page, j] = widened(kmax[b, h, page, j], x, True)
    return real


@numba.njit(cache=True, nogil=True)
def store_token(k_buf, v_buf, pos_buf, valid_buf, k, v, valid, seen, n):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # A decode step's append in one call (each numpy / torch op it replaces costs 5-15 us between a
    # step's matmuls, which evict the interpreter's working set): k_buf, v_buf (B, Hkv, cap, D);
    # pos_buf (B, Hkv, cap) int64; valid_buf (B, Hkv, cap) bool; k, v (B, Hkv, 1, D); valid (B, 1)
    # bool; seen (B,) int64 real tokens so far, advanced in place. Writes slot n; True if every row
    # is a real token.
    real = True
    for b in range(k.shape[0]):
        ok = valid[b, 0]
        p = seen[b] if ok else -1
        for h in range(k.shape[1]):
            for j in range(k.shape[3]):
                k_buf[b, h, n, j] = k[b, h, 0, j]
                v_buf[b, h, n, j] = v[b, h, 0, j]
            pos_buf[b, h, n] = p
            valid_buf[b, h, n] = ok
        if ok:
            seen[b] += 1
        else:
            real = False
    return real
