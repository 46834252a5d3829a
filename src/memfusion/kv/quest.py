"""``quest``: query-aware page selection at decode (Quest, arXiv 2406.10774).

Every token is kept, in pages of ``page_size`` token slots. Per page and KV head the layer
keeps the element-wise minimum and maximum of the page's keys (``kmin``, ``kmax``). At a decode
step (one new token per sequence) the query bounds each page's logits from above by
``sum_d max(q_d * kmin_d, q_d * kmax_d) >= q . k`` for every key ``k`` of the page, and attends
only to the current (newest, possibly partial) page plus the ``token_budget // page_size - 1``
other pages with the largest bound. Prefill chunks attend densely. By default the bounds are kept
as bfloat16, rounded outward (``kmin`` down, ``kmax`` up), so the score is still an upper bound of
every key's logit while a decode step reads half the bytes to score the pages (the paper keeps
them in its fp16 model's precision). The first ``dense_layers``
layers are plain dense layers (the paper keeps its first two layers dense).

GQA: selection is per KV head (K/V are read once per KV head); the bounds of the ``G`` query
heads sharing a KV head are summed, which is itself an upper bound of the group's summed
logits ``sum_g q_g . k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from memfusion.errors import InvalidInput
from memfusion.kv import hugepages, pageattn
from memfusion.kv.attention import grouped_attention
from memfusion.kv.policy import EvictingLayer, KVLayer, PolicyConfig, require, require_int
from memfusion.kv.spec import ModelSpec
from memfusion.kv.stats import LayerStats

if TYPE_CHECKING:
    from memfusion.kv.hf import MemfusionCache
    from memfusion.kv.stats import KVStats

INF = float("inf")


def round_outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (float32, float16 or bfloat16, no NaN) as bfloat16, rounded up (to the nearest bfloat16
    ``>= x``) or down (``<= x``); infinities stay. bfloat16 is float32's top 16 bits: dropping the
    low 16 rounds toward zero, which is the wanted direction for negative ``x`` going up and positive
    ``x`` going down; otherwise the pattern moves one step away from zero where bits were dropped."""
    x32 = x.float()
    bits = x32.view(torch.int32)
    away = ((bits & 0xFFFF) != 0) & ((x32 > 0) if up else (x32 < 0))
    return ((bits >> 16) + away).to(torch.int16).view(torch.bfloat16)  # in int16's range for any non-NaN x


@dataclass(frozen=True)
class Quest(PolicyConfig):
    """Quest page selection.

    - ``token_budget``: tokens attended per decode step and KV head, the current page included;
      whole pages only (``token_budget // page_size`` pages), so it must be >= ``page_size``;
    - ``page_size``: token slots per page (padding slots included, masked);
    - ``dense_layers``: the first layers stay dense (default 2, as in the paper: early layers
      attend broadly and selection hurts them most);
    - ``exact_bounds``: keep ``kmin``/``kmax`` exact, in the keys' dtype. Default False: bfloat16
      rounded outward (``kmin`` to the nearest bfloat16 below or equal, ``kmax`` above or equal),
      which keeps the score an upper bound of ``q . k`` for every key of the page; the score may
      exceed the exact bound by about 2^-8 relative, which only reorders near-ties. Half the bytes
      the selection reads at each decode step (and keeps), and it is exact for bfloat16 models;
    - ``oracle_recall``: also compute the true attention per page at every selecting decode
      step and report in ``stats.extra["quest_recall"]`` the fraction of the oracle's top pages
      (by attention mass, as many as were selected) that were selected. Costs a dense pass.

    ``bytes_resident`` of a quest layer: K/V of every token slot processed (padding included, as
    the dense layer counts it) plus ``kmin``/``kmax`` of every page started, i.e. per sequence
    ``slots * token_bytes + ceil(slots / page_size) * 2 * Hkv * D * bound_bytes`` (``bound_bytes``:
    2, or the keys' element size with ``exact_bounds``); dense layers count as ``dense``.
    """

    token_budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2
    exact_bounds: bool = False
    oracle_recall: bool = False
    name = "quest"

    def __post_init__(self) -> None:
        require_int(self.page_size, "page_size", 1)
        require_int(self.token_budget, "token_budget", 1)
        require(
            self.token_budget >= self.page_size,
            f"token_budget ({self.token_budget}) must be >= page_size ({self.page_size}): quest attends to "
            "whole pages and always to the current one; raise token_budget or lower page_size",
        )
        require_int(self.dense_layers, "dense_layers", 0)
        for flag in ("exact_bounds", "oracle_recall"):
            value = getattr(self, flag)
            require(isinstance(value, bool), f"{flag} must be True or False, got {value!r}")

    @property
    def budget_pages(self) -> int:
        """Pages attended per decode step and KV head, the current page included."""
        return self.token_budget // self.page_size

    def bound_dtype(self, spec: ModelSpec) -> torch.dtype:
        """The dtype of ``kmin``/``kmax``: the keys' with ``exact_bounds``, else bfloat16."""
        return spec.dtype if self.exact_bounds else torch.bfloat16

    def page_bytes(self, spec: ModelSpec) -> int:
        """Bytes of one page's ``kmin`` + ``kmax`` over the KV heads of one sequence."""
        return 2 * spec.num_kv_heads * spec.head_dim * self.bound_dtype(spec).itemsize

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        if layer_idx < self.dense_layers:
            return EvictingLayer(layer_idx, spec)
        return QuestLayer(layer_idx, spec, self)

    def analytic_bytes(self, seen: int, spec: ModelSpec, batch: int = 1) -> int:
        n_dense = min(self.dense_layers, spec.num_layers)
        pages = -(-seen // self.page_size)
        per_quest_layer = seen * spec.token_bytes + pages * self.page_bytes(spec)
        return batch * (n_dense * seen * spec.token_bytes + (spec.num_layers - n_dense) * per_quest_layer)

    def cache_stats(self, cache: MemfusionCache, stats: KVStats) -> None:
        """Report the oracle recall (the hook :meth:`MemfusionCache.stats` calls)."""
        if not self.oracle_recall:
            return
        layers = [la for la in cache.kv_layers if isinstance(la, QuestLayer)]
        hits = sum(la.recall_hits for la in layers)
        total = sum(la.recall_total for la in layers)
        stats.extra["quest_recall"] = hits / total if total else 1.0


class QuestLayer(KVLayer):
    """All tokens of one layer in a page-major buffer, with per-page key bounds.

    Quest keeps its own per-sequence page layout: token slot ``s`` (the ``s``-th token slot
    processed, padding included, the same for every sequence of the batch) lives in page
    ``s // page_size`` at offset ``s % page_size``. Buffers (capacity ``C`` pages, doubled when
    full, zero-filled so unwritten slots are finite):

    - ``k``, ``v``: ``(B, Hkv, C, S, D)`` (contiguous, so also a token-major ``(B, Hkv, C*S, D)``);
    - ``valid``: ``(B, C, S)`` bool, True for real tokens (False for padding and unwritten slots);
    - ``kmin``, ``kmax``: ``(B, Hkv, C, D)`` over the *valid* keys of each page (bfloat16 rounded
      outward unless ``exact_bounds``); ``+inf``/``-inf`` for a page with no valid key (such a page is
      never scored above a non-empty one);
    - ``nonempty``: ``(B, C)`` bool, the page holds at least one valid key.

    Invariant: slots ``[0, slots)`` are written, pages ``[0, ceil(slots / S))`` are started and
    their bounds are exact (or rounded outward) over their valid keys.
    """

    def __init__(self, layer_idx: int, spec: ModelSpec, cfg: Quest) -> None:
        super().__init__(layer_idx, spec)
        self.cfg = cfg
        self.pages_selected = 0
        self.pages_total = 0
        self.recall_hits = 0
        self.recall_total = 0
        #: ``(B, Hkv, k)`` page indices attended at the last selecting decode step (None: all).
        self.last_selection: torch.Tensor | None = None
        self._init_buffers(0)

    def _init_buffers(self, batch: int) -> None:
        s, d = self.spec, self.spec.head_dim
        S, h = self.cfg.page_size, s.num_kv_heads
        self.batch, self.slots, self.cap = batch, 0, 0
        self.padded = False  # some written slot holds padding (else masks and empty-page checks are skipped)
        self.k = torch.zeros(batch, h, 0, S, d, dtype=s.dtype, device=s.device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, 0, S, dtype=torch.bool, device=s.device)
        self.kmin = torch.zeros(batch, h, 0, d, dtype=self.cfg.bound_dtype(s), device=s.device)
        self.kmax = torch.zeros_like(self.kmin)
        self.nonempty = torch.zeros(batch, 0, dtype=torch.bool, device=s.device)
        #: ``(2, rows, S*D)``: the K and V pages gathered at a selecting decode step (kept between steps).
        self._gathered = torch.empty(2, 0, S * d, dtype=s.dtype, device=s.device)
        self._views()

    def _views(self) -> None:
        """numpy views of the buffers for the compiled decode step (CPU only), renewed with the buffers."""
        buffers = (self.k, self.v, self.kmin, self.kmax, self.valid, self.nonempty)
        self._host = pageattn.host_views(*buffers) if self.k.device.type == "cpu" else ()

    @property
    def num_pages(self) -> int:
        return -(-self.slots // self.cfg.page_size)

    def _grow(self, pages: int) -> None:
        new = max(pages, 2 * self.cap, 4)
        used = self.num_pages

        def fresh(old: torch.Tensor, fill: float) -> torch.Tensor:
            shape = list(old.shape)
            axis = 2 if old.dim() >= 4 else 1  # the page axis: (B, Hkv, C, ...) or (B, C, ...)
            shape[axis] = new
            # K/V pages are read scattered, a few at a time: on huge pages where possible (fewer TLB misses)
            make = hugepages.full if old.dim() == 5 else torch.full
            t = make(tuple(shape), fill, dtype=old.dtype, device=old.device)
            t.narrow(axis, 0, used).copy_(old.narrow(axis, 0, used))
            return t

        self.k, self.v = fresh(self.k, 0.0), fresh(self.v, 0.0)
        self.valid, self.nonempty = fresh(self.valid, False), fresh(self.nonempty, False)
        self.kmin, self.kmax = fresh(self.kmin, INF), fresh(self.kmax, -INF)
        self.cap = new
        self._views()

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, C, S, D)`` -> the written slots ``(B, Hkv, slots, D)`` (a view)."""
        b, h, c, S, d = t.shape
        return t.view(b, h, c * S, d)[:, :, : self.slots]

    def _append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """``k``/``v (B, Hkv, m, D)``, ``valid (B, m)``: write slots and refresh touched pages' bounds."""
        b, m = valid.shape
        S = self.cfg.page_size
        start, end = self.slots, self.slots + m
        if -(-end // S) > self.cap:
            self._grow(-(-end // S))
        self.slots = end
        if m == 1 and pageattn.serves(k, self.k):  # decode: one compiled call
            self.padded = not pageattn.append_token(self._host, k, v, valid, start) or self.padded
            return
        self.padded = self.padded or not bool(valid.all())
        self._flat(self.k)[:, :, start:end] = k
        self._flat(self.v)[:, :, start:end] = v
        self.valid.view(b, self.cap * S)[:, start:end] = valid
        p0, p1 = start // S, -(-end // S)
        if m == 1:  # decode: one slot, an element-wise update of its page
            kk = k[:, :, 0]  # (B, Hkv, D)
            cur_min, cur_max = self.kmin[:, :, p0], self.kmax[:, :, p0]
            if self.padded:
                ok = valid.view(b, 1, 1)  # (B, 1, 1)
                kk_min, kk_max = torch.where(ok, kk, INF), torch.where(ok, kk, -INF)
                self.nonempty[:, p0] |= valid[:, 0]
            else:  # every slot is a real token (and the page is non-empty once written)
                kk_min = kk_max = kk
                self.nonempty[:, p0] = True
            torch.minimum(cur_min, self._rounded(kk_min, False), out=cur_min)
            torch.maximum(cur_max, self._rounded(kk_max, True), out=cur_max)
            return
        keys = self.k[:, :, p0:p1]  # (B, Hkv, p, S, D)
        ok = self.valid[:, p0:p1].view(b, 1, p1 - p0, S, 1)  # (B, 1, p, S, 1)
        self.kmin[:, :, p0:p1] = self._rounded(torch.where(ok, keys, INF).amin(dim=3), False)  # (B, Hkv, p, D)
        self.kmax[:, :, p0:p1] = self._rounded(torch.where(ok, keys, -INF).amax(dim=3), True)
        self.nonempty[:, p0:p1] = self.valid[:, p0:p1].any(dim=2)

    def _rounded(self, bound: torch.Tensor, up: bool) -> torch.Tensor:
        """A bound as stored: as it is with ``exact_bounds``, else bfloat16 rounded outward."""
        return bound if self.cfg.exact_bounds else round_outward(bound, up)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        b, tq = valid.shape
        if self.slots == 0:
            self._init_buffers(b)
        elif b != self.batch:
            raise InvalidInput(
                f"layer {self.layer_idx}: a batch of {b} sequences reached a quest cache holding {self.batch}; "
                "build a new cache (or reset it) for a different batch"
            )
        self._append(k, v, valid)
        pages, budget = self.num_pages, self.cfg.budget_pages
        if tq == 1 and pages > budget:
            return self._select_and_attend(q, scaling)
        key_mask = self.valid.view(b, 1, self.cap * self.cfg.page_size)[:, :, : self.slots]  # (B, 1, n)
        if tq > 1:
            return grouped_attention(q, self._flat(self.k), self._flat(self.v), scaling, key_mask, causal_tail=tq)
        self._count_selection(pages, None)
        return grouped_attention(q, self._flat(self.k), self._flat(self.v), scaling, key_mask, causal_tail=1)

    def _count_selection(self, read: int, sel: torch.Tensor | None) -> None:
        """A decode step read ``read`` of the ``num_pages`` pages of every (sequence, KV head);
        ``sel``: which (None: all)."""
        bh = self.batch * self.spec.num_kv_heads
        self.pages_selected += bh * read
        self.pages_total += bh * self.num_pages
        self.last_selection = sel

    def page_scores(self, q: torch.Tensor, pages: int) -> torch.Tensor:
        """``(B, Hkv, pages)``: the group-summed bound ``sum_g sum_d max(q_gd kmin_d, q_gd kmax_d)``.

        ``max(q kmin, q kmax)`` is ``q kmax`` where ``q >= 0`` and ``q kmin`` elsewhere, so the
        bound is two products with the positive and negative parts of the group-summed query
        (as row vectors ``q @ K^T``, the fast layout on CPU; ``K @ q`` is several times slower).
        Pages without a valid key score ``-inf``.
        """
        b, hq, _, d = q.shape
        h = self.spec.num_kv_heads
        qg = q.view(b, h, hq // h, d)  # (B, Hkv, G, D)
        q_pos = qg.clamp_min(0).sum(dim=2, keepdim=True)  # (B, Hkv, 1, D)
        q_neg = qg.clamp_max(0).sum(dim=2, keepdim=True)  # (B, Hkv, 1, D)
        kmin, kmax = self.kmin[:, :, :pages], self.kmax[:, :, :pages]
        if kmin.dtype != q.dtype:  # bfloat16 bounds: scored in float32 (a rounded product could undercut the bound)
            q_pos, q_neg, kmin, kmax = q_pos.float(), q_neg.float(), kmin.float(), kmax.float()
        bound = torch.matmul(q_pos, kmax.transpose(-1, -2))  # (B, Hkv, 1, pages)
        bound = (bound + torch.matmul(q_neg, kmin.transpose(-1, -2))).squeeze(2)  # (B, Hkv, pages)
        return torch.where(self.nonempty[:, None, :pages], bound, -INF) if self.padded else bound

    def _select_and_attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        b, h, S, d = self.batch, self.spec.num_kv_heads, self.cfg.page_size, self.spec.head_dim
        pages, budget, cap = self.num_pages, self.cfg.budget_pages, self.cap
        cur = pages - 1
        in_place = pageattn.serves(q, self.k)
        tail = -self.slots % S  # unwritten slots at the end of the current page (the last selected)
        if in_place and not self.padded and not self.cfg.oracle_recall:  # selection and attention, one call
            out, sel = pageattn.select_and_attend(q, self._host, cur, budget - 1, S - tail, scaling)
            self._count_selection(budget, sel)
            return out
        if in_place:  # bounds, top pages and their order in one pass (the same choice as below)
            sel = pageattn.select_pages(
                q, self.kmin, self.kmax, self.nonempty if self.padded else None, cur, budget - 1
            )
        else:
            sel = torch.full((b, h, 1), cur, dtype=torch.long, device=q.device)  # (B, Hkv, 1): the current page
            if budget > 1:
                top = torch.topk(self.page_scores(q, cur), budget - 1, dim=-1, sorted=False).indices  # (B, Hkv, k-1)
                # Ascending page order: the gather reads memory forwards; the current page stays last.
                sel = torch.cat([top.sort(dim=-1).values, sel], dim=-1)  # (B, Hkv, k)
        mask = None  # every selected slot is a real token, except unwritten slots of the current page
        if self.padded:
            vrows = sel + (torch.arange(b, device=q.device) * cap).view(b, 1, 1)  # rows of a (B*C) view
            mask = self.valid.view(b * cap, S).index_select(0, vrows.view(-1)).view(b, h, budget * S)  # (B, Hkv, k*S)
            mask[:, :, budget * S - S + (self.slots - 1) % S] = True  # the query's own slot, even if padding
            mask = None if bool(mask.all()) else mask
        self._count_selection(budget, sel)
        if self.cfg.oracle_recall:
            self._oracle(q, sel, scaling)
        if in_place:  # the selected pages read in place, once
            return pageattn.page_attention(q, self.k, self.v, sel, S - tail, scaling, mask)
        rows = sel + (torch.arange(b * h, device=q.device) * cap).view(b, h, 1)  # rows of a (B*Hkv*C) view
        rows = rows.view(-1)  # (B*Hkv*k,)
        if self._gathered.shape[1] != rows.numel():  # reused between steps: no fresh pages to fault in
            self._gathered = torch.empty(2, rows.numel(), S * d, dtype=self.k.dtype, device=self.k.device)
        ks = torch.index_select(self.k.view(b * h * cap, S * d), 0, rows, out=self._gathered[0])
        vs = torch.index_select(self.v.view(b * h * cap, S * d), 0, rows, out=self._gathered[1])
        ks, vs = ks.view(b, h, budget * S, d), vs.view(b, h, budget * S, d)  # (B, Hkv, k*S, D)
        if mask is None and tail:  # the current page is partial: its unwritten slots, the last gathered, are left out
            ks, vs = ks[:, :, : budget * S - tail], vs[:, :, : budget * S - tail]
        return grouped_attention(q, ks, vs, scaling, mask, cached=True)

    def _oracle(self, q: torch.Tensor, sel: torch.Tensor, scaling: float) -> None:
        """Count how many of the oracle's top pages (by true attention mass) ``sel`` contains."""
        b, hq, _, d = q.shape
        h, S, n, pages = self.spec.num_kv_heads, self.cfg.page_size, self.slots, self.num_pages
        qg = q.view(b, h, hq // h, d)  # (B, Hkv, G, D)
        logits = torch.matmul(qg, self._flat(self.k).transpose(-1, -2)) * scaling  # (B, Hkv, G, n)
        ok = self.valid.view(b, 1, 1, self.cap * S)[..., :n].clone()  # (B, 1, 1, n)
        ok[..., n - 1] = True
        probs = torch.softmax(logits.masked_fill(~ok, -INF), dim=-1)
        mass = torch.zeros(b, h, pages * S, dtype=probs.dtype, device=q.device)
        mass[:, :, :n] = probs.sum(dim=2)
        mass = mass.view(b, h, pages, S).sum(dim=-1)  # (B, Hkv, pages)
        oracle = torch.topk(mass, sel.shape[-1], dim=-1).indices  # (B, Hkv, k)
        self.recall_hits += int((oracle.unsqueeze(-1) == sel.unsqueeze(-2)).any(dim=-1).sum())
        self.recall_total += oracle.numel()

    def stats(self) -> LayerStats:
        h, d, e = self.spec.num_kv_heads, self.spec.head_dim, self.spec.elem_bytes
        per_slot = 2 * h * d * e  # K+V of one slot for one sequence
        allocated = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kmin, self.kmax))
        return LayerStats(
            self.layer_idx,
            tokens_resident=self.batch * self.slots,
            bytes_resident=self.batch * (self.slots * per_slot + self.num_pages * self.cfg.page_bytes(self.spec)),
            bytes_allocated=allocated,
            pages_selected=self.pages_selected,
            pages_total=self.pages_total,
        )

    def clear(self) -> None:
        self._init_buffers(0)
        self.pages_selected = self.pages_total = self.recall_hits = self.recall_total = 0
        self.last_selection = None
