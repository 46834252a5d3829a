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

__all__ = ["append_token", "available", "page_attention", "select_and_attend", "select_pages", "serves"]


def select_pages(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, nonempty: torch.Tensor | None, pages: int, keep: int
) -> torch.Tensor:
    """Quest's selection in one pass over the page bounds: ``(B, Hkv, keep + 1)`` page indices, the
    ``keep`` candidates among pages ``[0, pages)`` with the largest group-summed bound
    ``sum_g sum_d max(q_gd kmin_d, q_gd kmax_d)`` in ascending order, then page ``pages`` (the
    current one). ``q (B, Hq, 1, D)``; ``kmin``, ``kmax`` ``(B, Hkv, C, D)`` contiguous; ``nonempty
    (B, C)`` bool (pages without a valid key score ``-inf``) or None when nothing is padded."""
    b, hq, _, d = q.shape
    sel = np.empty((b, kmin.shape[1], keep + 1), dtype=np.int64)  # numpy: fewer torch calls per layer step
    from memfusion.kv.jitkernels import select_kernel  # numba: imported on first use

    select_kernel(
        np.ascontiguousarray(q.numpy().reshape(b, hq, d)),
        kmin.numpy(),
        kmax.numpy(),
        ALL_PAGES if nonempty is None else nonempty.contiguous().numpy(),
        nonempty is not None,
        int(pages),
        sel,
    )
    return torch.from_numpy(sel)


def append_token(layer_buffers: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor, slot: int) -> None:
    """Write one real token per sequence at token slot ``slot`` and widen its page's bounds in place.
    ``layer_buffers``: ``(k, v, kmin, kmax, valid, nonempty)`` as :class:`~memfusion.kv.quest.QuestLayer`
    keeps them; ``k``, ``v`` ``(B, Hkv, 1, D)``."""
    kb, vb, kmin, kmax, valid, nonempty = layer_buffers
    page, off = divmod(slot, kb.shape[3])
    b, h, _, d = k.shape
    from memfusion.kv.jitkernels import store_page_token  # numba: imported on first use

    store_page_token(
        kb.numpy(),
        vb.numpy(),
        kmin.numpy(),
        kmax.numpy(),
        valid.numpy(),
        nonempty.numpy(),
        k.reshape(b, h, d).contiguous().numpy(),
        v.reshape(b, h, d).contiguous().numpy(),
        page,
        off,
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
    k: torch.Tensor,
    v: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    pages: int,
    keep: int,
    last: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_pages` then :func:`page_attention` in one compiled call, when nothing is padded
    (no key mask): one dispatch and one set of conversions per layer step instead of two, each torch
    or numpy call costing 5-15 us between a decode step's matmuls. Arguments as there; returns
    ``(out (B, 1, Hq, D), sel (B, Hkv, keep + 1))``."""
    b, h, c, s, d = k.shape
    if not (k.is_contiguous() and v.is_contiguous() and kmin.is_contiguous() and kmax.is_contiguous()):
        raise ValueError("select_and_attend reads pages and bounds in place: pass contiguous buffers")
    sel = np.empty((b, h, keep + 1), dtype=np.int64)
    first = np.empty_like(sel)  # filled by the kernel from sel
    rows_k, rows_v = k.numpy().reshape(-1, d), v.numpy().reshape(-1, d)
    out = decodeattn.run_rows(
        q, rows_k, rows_v, first, s, last, scaling, None, 0, -1, (kmin.numpy(), kmax.numpy(), pages, c, sel)
    )
    return out, torch.from_numpy(sel)
