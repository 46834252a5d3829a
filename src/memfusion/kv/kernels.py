"""Shared pieces of memfusion's numba kernels (:mod:`.pageattn`, :mod:`.decodeattn`): the fastmath
flags, whether numba is installed and serves given tensors, a vectorisable ``exp`` for softmax
weights and a software prefetch."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

FAST = {"reassoc", "contract", "nsz", "arcp"}
"""fastmath without ``nnan``/``ninf``: masked slots are ``-inf`` logits."""


@cache
def available() -> bool:
    """numba is installed (the kernels can be compiled)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def serves(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The kernels handle these tensors: float32 on the CPU, numba installed."""
    return q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and available()


@cache
def exp_kernel() -> Any:
    import numba
    import numpy as np

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

    return exp_shifted


@cache
def prefetch_kernel() -> Any:
    """``prefetch_rows(a, row, n)``: hint the CPU to fetch rows ``[row, row + n)`` of the C-contiguous
    2-D ``a`` (one prefetch per 64-byte line), for kernels that jump between short runs of rows (quest's pages,
    where the hardware prefetchers restart at every jump: +10-15% read rate measured on 16-row pages).
    ``llvm.prefetch`` (read, high locality, data cache) through a numba intrinsic."""
    from llvmlite import binding, ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    # the intrinsic's name carries its pointer type: opaque ``ptr`` from LLVM 15 on, ``i8*`` before
    prefetch_name = "llvm.prefetch.p0" if binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"

    @intrinsic
    def prefetch_rows(typingctx, arr, row, n):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            shape = cgutils.unpack_tuple(builder, ary.shape)
            strides = cgutils.unpack_tuple(builder, ary.strides)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), prefetch_name
            )
            row_bytes = builder.mul(shape[1], context.get_constant(types.intp, aryty.dtype.bitwidth // 8))
            base = builder.ptrtoint(ary.data, ir.IntType(64))
            start = builder.add(base, builder.mul(args[1], strides[0]))
            zero, line = context.get_constant(types.intp, 0), context.get_constant(types.intp, 64)
            with cgutils.for_range_slice(builder, zero, builder.mul(row_bytes, args[2]), line) as (off, _):
                ptr = builder.inttoptr(builder.add(start, off), i8p)
                builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(arr, types.intp, types.intp), codegen

    return prefetch_rows
