"""Quest's CPU decode step as numba kernels: select pages, attend to them in place, append a token.

Quest's torch path scores pages with a few small ops, gathers the selected pages into a
contiguous buffer, then attends over it: each selected K/V byte is read, written and read again.
Here :func:`select_pages` computes the page bounds and picks the top pages in one pass,
:func:`page_attention` computes the same softmax attention reading every selected key and value
exactly once, straight from the page-major buffers (the selected pages are the runs of
:func:`memfusion.kv.decodeattn.run_attention`, split over the cores), and
:func:`append_token` writes a decode step's token and widens its page's bounds in place. They are
compiled by numba (``parallel`` over sequences x KV heads, ``fastmath`` so the ``D``-wide dot
products vectorise) the first time they run (about 20 s); ``cache=True`` keeps the machine code
between processes.

They serve float32 CPU tensors (:func:`serves`); quest keeps its torch path for other dtypes,
CUDA tensors and when numba is not installed.
"""

from __future__ import annotations

import numpy as np
import torch

from memfusion.kv import decodeattn
from memfusion.kv.kernels import ALL_PAGES, available, serves

__all__ = ["append_token", "available", "host_views", "page_attention", "select_and_attend", "select_pages", "serves"]


def host_views(*tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
    """numpy views (no copies) of CPU tensors, as the kernels read them: bfloat16 (page bounds) as
    its bit patterns (uint16; numpy has no bfloat16). A quest layer keeps these of its buffers, so a
    decode step makes no ``.numpy()`` call for them (each costs a few us between a step's matmuls)."""
    return tuple(
        t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy() for t in tensors
    )


def select_pages(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, nonempty: torch.Tensor | None, pages: int, keep: int
) -> torch.Tensor:
    """Quest's selection in one pass over the page bounds: ``(B, Hkv, keep + 1)`` page indices, the
    ``keep`` candidates among pages ``[0, pages)`` with the largest group-summed bound
    ``sum_g sum_d max(q_gd kmin_d, q_gd kmax_d)`` in ascending order, then page ``pages`` (the
    current one). ``q (B, Hq, 1, D)``; ``kmin``, ``kmax`` ``(B, Hkv, C, D)`` contiguous, float32 or
    bfloat16 (scored in float32); ``nonempty
    (B, C)`` bool (pages without a valid key score ``-inf``) or None when nothing is padded."""
    b, hq, _, d = q.shape
    sel = np.empty((b, kmin.shape[1], keep + 1), dtype=np.int64)  # numpy: fewer torch calls per layer step
    from memfusion.kv.jitkernels import select_kernel  # numba: imported on first use

    lo, hi = host_views(kmin, kmax)
    select_kernel(
        np.ascontiguousarray(q.numpy().reshape(b, hq, d)),
        lo,
        hi,
        ALL_PAGES if nonempty is None else nonempty.contiguous().numpy(),
        nonempty is not None,
        int(pages),
        sel,
    )
    return torch.from_numpy(sel)


def append_token(
    host: tuple[np.ndarray, ...], k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, slot: int
) -> bool:
    """Write one token per sequence at token slot ``slot``; a real one (``valid``) widens its page's
    bounds in place, a padding one is marked not valid. ``host``: :func:`host_views` of ``(k, v, kmin,
    kmax, valid, nonempty)`` as :class:`~memfusion.kv.quest.QuestLayer` keeps them; ``k``, ``v``
    ``(B, Hkv, 1, D)``; ``valid (B, 1)`` bool. Returns True if every token was real."""
    page, off = divmod(slot, host[0].shape[3])
    from memfusion.kv.jitkernels import store_page_token  # numba: imported on first use

    kb, vb, kmin, kmax, valid_buf, nonempty = host
    return bool(
        store_page_token(kb, vb, kmin, kmax, valid_buf, nonempty, k.numpy(), v.numpy(), valid.numpy(), page, off)
    )


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
    The pages are runs of :func:`memfusion.kv.decodeattn.run_attention`.
    """
    b, h, c, s, d = k.shape
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("page_attention reads pages in place: pass contiguous page-major k and v")
    # numpy throughout: each torch call saved is 5-15 us of a layer step
    heads = np.arange(b * h, dtype=np.int64).reshape(b, h, 1) * c  # (B, Hkv, 1): each head's page 0
    first = (heads + sel.numpy()) * s  # (B, Hkv, P): each selected page's first row in (B*Hkv*C*S, D)
    rows_k, rows_v = k.numpy().reshape(-1, d), v.numpy().reshape(-1, d)
    return decodeattn.run_rows(q, rows_k, rows_v, first, s, last, scaling, mask, 0, -1)


def select_and_attend(
    q: torch.Tensor,
    host: tuple[np.ndarray, ...],
    pages: int,
    keep: int,
    last: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_pages` then :func:`page_attention` in one compiled call, when nothing is padded
    (no key mask): one dispatch and one set of conversions per layer step instead of two, each torch
    or numpy call costing 5-15 us between a decode step's matmuls. ``host``: :func:`host_views` of
    the C-contiguous ``(k, v, kmin, kmax)``; other arguments as there. Returns
    ``(out (B, 1, Hq, D), sel (B, Hkv, keep + 1))``."""
    k, v, kmin, kmax = host[:4]
    b, h, c, s, d = k.shape
    sel = np.empty((b, h, keep + 1), dtype=np.int64)
    first = np.empty_like(sel)  # filled by the kernel from sel
    rows_k, rows_v = k.reshape(-1, d), v.reshape(-1, d)
    out = decodeattn.run_rows(q, rows_k, rows_v, first, s, last, scaling, None, 0, -1, (kmin, kmax, pages, c, sel))
    return out, torch.from_numpy(sel)
