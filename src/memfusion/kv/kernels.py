"""Shared pieces of memfusion's numba kernels (:mod:`.pageattn`, :mod:`.jitkernels`): the fastmath
flags and whether numba is installed and serves given tensors. Importing this module does not
import numba."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

FAST = {"reassoc", "contract", "nsz", "arcp"}
"""fastmath without ``nnan``/``ninf``: masked slots are ``-inf`` logits."""

ALL_PAGES = np.ones((1, 1), dtype=np.bool_)
"""Quest's selection kernel's ``nonempty`` when nothing is padded (it then reads none of it)."""


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
