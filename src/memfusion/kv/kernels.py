"""Shared pieces of memfusion's numba kernels (:mod:`.pageattn`, :mod:`.decodeattn`): the fastmath
flags, whether numba is installed, and a vectorisable ``exp`` for softmax weights."""

from __future__ import annotations

from functools import cache
from typing import Any

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
