"""``paged``: every token, in fixed-size pages of a shared pool (vLLM's PagedAttention layout).

All layers follow one :class:`~memfusion.kv.pool.PagePool` (block tables, prefix hashing,
copy-on-write); each layer owns its K/V storage ``(Hkv, capacity, page_size, D)``, so a run of
consecutive pages is the strided view ``(Hkv, n * page_size, D)`` and attention reads pages in
place (no gather, no O(T) copy per decoded token). Only real tokens are stored: a sequence's
pages align on its real-token positions, so a prefix shared by left-padded rows hashes alike.
Prefix sharing assumes position ids count real tokens (as ``model.generate`` and
``memfusion.kv.generate`` do); a hit substitutes K/V computed for the same ids at the same
positions after the same prefix.

Per forward, the first layer to attend plans it once (``PagedState.begin``): each sequence's
real new tokens are appended to the pool with the ids seen by ``observe_input_ids``. Every layer
then applies the plan to its storage (copy-on-write copies, then writes) and each sequence
attends over its pages, the new tokens' own keys included (query ``i`` sees keys up to its own
position). ``Cache.batch_repeat_interleave`` forks each row's sequence: the copies share every
page until they diverge (copy-on-write).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from memfusion.errors import InvalidInput
from memfusion.kv import decodeattn
from memfusion.kv.attention import attention_logits, merge_partials, partial_attention
from memfusion.kv.policy import HOST_DTYPES, KVLayer, PolicyConfig, require_int
from memfusion.kv.pool import PagePool
from memfusion.kv.spec import ModelSpec
from memfusion.kv.stats import KVStats, LayerStats

if TYPE_CHECKING:
    from memfusion.kv.hf import MemfusionCache


@dataclass(frozen=True)
class Paged(PolicyConfig):
    """Lossless. ``bytes_resident`` = pages in use x page bytes (each shared page counted once).

    A page's bytes are ``2 * Hkv * page_size * D * elem`` per layer; a partial last page counts
    whole. ``tokens_resident`` counts the token slots written in used pages (each page once).
    """

    page_size: int = 16
    name = "paged"

    def __post_init__(self) -> None:
        require_int(self.page_size, "page_size", 1)

    def make_layers(self, spec: ModelSpec) -> list[KVLayer]:
        state = PagedState(self.page_size)
        return [PagedLayer(i, spec, state) for i in range(spec.num_layers)]

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        raise InvalidInput("paged layers share one page pool: build them with make_layers(spec)")

    def analytic_tokens(self, seen: int) -> int:
        return -(-seen // self.page_size) * self.page_size  # whole pages, no sharing

    def cache_stats(self, cache: MemfusionCache, stats: KVStats) -> None:
        """Fill the prefix-cache figures (called by ``MemfusionCache.stats``)."""
        layer = cache.kv_layers[0]
        if isinstance(layer, PagedLayer):
            stats.prefix_hits = layer.state.pool.hits
            stats.prefix_lookups = layer.state.pool.lookups


_NONE = np.zeros(0, dtype=np.int64)
"""An empty index array (a plan with no copies or writes); never written to."""


@dataclass
class _Read:
    """One sequence's view of a forward: its page runs, length and per-query key limit."""

    runs: list[tuple[int, int]]
    length: int
    limit: np.ndarray  # (Tq,) int64: query t sees keys at positions < limit[t]
    min_limit: int


@dataclass
class _Plan:
    """One forward's storage work and reads, shared by all layers (flat slot = page*ps + slot).

    Index arrays are numpy int64 (a decode step plans one token per sequence, where each torch call
    costs 5-15 us); :meth:`on` gives them as tensors on the storage's device where torch indexes."""

    copy_src: np.ndarray  # (C,) flat slots
    copy_dst: np.ndarray  # (C,)
    write_b: np.ndarray  # (W,) batch row of each written token
    write_t: np.ndarray  # (W,) its column in the forward
    write_dst: np.ndarray  # (W,) its flat slot
    reads: list[_Read]

    def on(self, device: torch.device) -> _Plan:
        def t(x: np.ndarray) -> Any:
            return torch.from_numpy(x).to(device)

        copies = t(self.copy_src), t(self.copy_dst)
        return _Plan(*copies, t(self.write_b), t(self.write_t), t(self.write_dst), self.reads)


class PagedState:
    """The block-table state every layer of one cache shares: the pool and the current plan."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.reset()

    def reset(self) -> None:
        self.pool = PagePool(self.page_size)
        self.seqs: list[int] = []  # pool sequence of each batch row
        self.ids: torch.Tensor | None = None
        self.plan: _Plan | None = None
        self.step = 0

    def observe(self, input_ids: torch.Tensor) -> None:
        self.ids = input_ids

    def repeat_rows(self, repeats: int) -> None:
        """Batch row ``i`` becomes rows ``i*repeats ..``: forks sharing every page."""
        require_int(repeats, "repeats", 1)
        self.seqs = [s if r == 0 else self.pool.fork(s) for s in self.seqs for r in range(repeats)]

    def begin(self, valid: torch.Tensor) -> None:
        """Plan the forward whose validity is ``valid (B, Tq)``: pool appends, copies, writes."""
        b, tq = valid.shape
        if not self.seqs:
            self.seqs = [self.pool.new_sequence() for _ in range(b)]
        elif len(self.seqs) != b:
            raise InvalidInput(f"the batch changed from {len(self.seqs)} to {b} rows; build a new cache")
        ids = self.ids if self.ids is not None and tuple(self.ids.shape) == (b, tq) else None
        self.ids = None
        ids_rows: list[list[int]] | None = None if ids is None else ids.tolist()
        ps = self.page_size
        valid_cpu = valid.cpu().numpy()  # numpy throughout: a decode step plans one token a sequence
        all_valid = bool(valid_cpu.all())
        # real tokens up to each column (B, Tq); with no padding the same 1..Tq for every row
        csum = np.arange(1, tq + 1)[None].repeat(b, 0) if all_valid else valid_cpu.cumsum(axis=1)
        cs: list[int] = []
        cd: list[int] = []
        wb: list[int] = []
        wt: list[int] = []
        wd: list[int] = []
        reads: list[_Read] = []
        for row, seq in enumerate(self.seqs):
            cols = list(range(tq)) if all_valid else valid_cpu[row].nonzero()[0].tolist()
            old = self.pool.length(seq)
            toks = None if ids_rows is None else [ids_rows[row][c] for c in cols]
            plan = self.pool.append(seq, len(cols), toks)
            for src, dst, n in plan.copies:
                cs += range(src * ps, src * ps + n)
                cd += range(dst * ps, dst * ps + n)
            for page, slot, first, count in plan.writes:
                wb += [row] * count
                wt += cols[first : first + count]
                wd += range(page * ps + slot, page * ps + slot + count)
            # A padding query sees what its row's next real token would see (at least one key,
            # so no softmax row is empty once the sequence holds a token).
            limit = old + csum[row]  # (Tq,)
            low = old + 1 if all_valid else max(int(limit.min()), 1)
            reads.append(_Read(self.pool.runs(seq), old + len(cols), limit if all_valid else np.maximum(limit, 1), low))

        def index(xs: list[int]) -> np.ndarray:
            return np.array(xs, dtype=np.int64) if xs else _NONE

        self.plan = _Plan(index(cs), index(cd), index(wb), index(wt), index(wd), reads)
        self.step += 1


class PagedLayer(KVLayer):
    """One layer's K/V pages ``(Hkv, capacity, page_size, D)``, following the shared state."""

    def __init__(self, layer_idx: int, spec: ModelSpec, state: PagedState) -> None:
        super().__init__(layer_idx, spec)
        self.state = state
        self.step = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        #: numpy views of ``k``/``v`` as ``(Hkv, slots, D)`` on the CPU for float32/64 (None elsewhere):
        #: a decode step writes and reads them without a torch call
        self.host: tuple[np.ndarray, np.ndarray] | None = None

    def observe_input_ids(self, input_ids: torch.Tensor) -> None:
        self.state.observe(input_ids)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.layer_idx == 0:  # the state is shared: fork its sequences once
            self.state.repeat_rows(repeats)

    def _storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V tensors, grown (doubling with the pool) to the pool's capacity."""
        cap, ps, s = self.state.pool.capacity, self.state.page_size, self.spec
        if self.k is None or self.v is None or self.k.shape[1] < cap:
            shape = (s.num_kv_heads, cap, ps, s.head_dim)
            k = torch.empty(shape, dtype=s.dtype, device=s.device)
            v = torch.empty(shape, dtype=s.dtype, device=s.device)
            if self.k is not None and self.v is not None:
                k[:, : self.k.shape[1]] = self.k
                v[:, : self.v.shape[1]] = self.v
            self.k, self.v = k, v
            host = s.device.type == "cpu" and s.dtype in HOST_DTYPES
            flat = (shape[0], cap * ps, shape[3])
            self.host = (k.numpy().reshape(flat), v.numpy().reshape(flat)) if host else None
        return self.k, self.v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        if self.step == self.state.step:  # the first layer of a new forward plans it
            self.state.begin(valid)
        self.step = self.state.step
        plan = self.state.plan
        assert plan is not None
        kp, vp = self._storage()
        hkv, cap, ps, d = kp.shape
        # on the CPU through numpy (fancy indexing ~4x cheaper a call than torch's, which a decode
        # step pays per layer); elsewhere, or under autograd, torch on the flat views
        flat_k: Any  # (Hkv, slots, D), numpy or torch, and the new tokens alike
        flat_v: Any
        new_k: Any
        new_v: Any
        if self.host is not None and not k.requires_grad:
            (flat_k, flat_v), new_k, new_v, idx = self.host, k.numpy(), v.numpy(), plan
        else:
            flat_k, flat_v = kp.view(hkv, cap * ps, d), vp.view(hkv, cap * ps, d)
            new_k, new_v, idx = k, v, plan.on(kp.device)
        if len(plan.copy_dst):
            flat_k[:, idx.copy_dst] = flat_k[:, idx.copy_src]
            flat_v[:, idx.copy_dst] = flat_v[:, idx.copy_src]
        if len(plan.write_dst):
            flat_k[:, idx.write_dst] = new_k[idx.write_b, :, idx.write_t].swapaxes(0, 1)  # (W, Hkv, D) -> (Hkv, W, D)
            flat_v[:, idx.write_dst] = new_v[idx.write_b, :, idx.write_t].swapaxes(0, 1)
        if q.shape[2] == 1 and len(plan.reads) == 1:  # a one-sequence decode step
            one = self._decode_one(q, kp, plan.reads[0], scaling)
            if one is not None:
                return one
        outs = [self._attend_one(q[i], kp, vp, r, scaling) for i, r in enumerate(plan.reads)]
        out = torch.stack(outs)  # (B, Hq, Tq, D)
        return out.transpose(1, 2)  # (B, Tq, Hq, D)

    def _decode_one(self, q: torch.Tensor, kp: torch.Tensor, r: _Read, scaling: float) -> torch.Tensor | None:
        """A one-sequence decode step whose pages form one run, by the split-K kernel in place:
        ``q (1, Hq, 1, D)`` -> ``(1, 1, Hq, D)``; None where that does not apply. The batch-of-one
        case of :meth:`_attend_one` without its per-sequence views, stack and transpose (each torch
        call costs 5-15 us between a decode step's matmuls)."""
        if len(r.runs) != 1 or r.length > r.min_limit or self.host is None or not decodeattn.serves(q, kp):
            return None
        hk, hv = self.host  # (Hkv, slots, D)
        first = r.runs[0][0] * kp.shape[2]  # the run is slots [first, first + length) of each head
        return decodeattn.decode_rows(q, hk[None], hv[None], first, r.length, scaling)

    def _attend_one(
        self, q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, r: _Read, scaling: float
    ) -> torch.Tensor:
        """``q (Hq, Tq, D)`` over one sequence's pages -> ``(Hq, Tq, D)``."""
        hq, tq, d = q.shape
        hkv, ps = kp.shape[0], kp.shape[2]
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        start = 0
        for first, n in r.runs:
            count = min(n * ps, r.length - start)
            keys = kp[:, first : first + n].reshape(hkv, n * ps, d)[:, :count]  # (Hkv, N, D): a view
            vals = vp[:, first : first + n].reshape(hkv, n * ps, d)[:, :count]
            mask = None
            if start + count > r.min_limit:  # some query must not see some key of this run
                pos = torch.arange(start, start + count, device=q.device)  # (N,)
                allowed = pos.unsqueeze(0) < torch.from_numpy(r.limit).to(q.device).unsqueeze(1)  # (Tq, N)
                mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
            parts.append((keys, vals, mask))
            start += count
        if not parts:  # nothing stored yet and only padding queries
            return torch.zeros_like(q)
        if len(parts) == 1:  # one run, read in place (every query sees at least key 0)
            keys, vals, mask = parts[0]
            g = hq // hkv
            if tq == 1 and mask is None and decodeattn.serves(q, kp):  # decode: the dense layer's kernel, in place
                first = r.runs[0][0]
                flat = kp.shape[1] * ps
                out = decodeattn.decode_attention(
                    q.unsqueeze(0),  # (1, Hq, 1, D)
                    kp.view(1, hkv, flat, d),  # (1, Hkv, slots, D): the run is slots [first*ps, +count)
                    vp.view(1, hkv, flat, d),
                    first * ps,
                    keys.shape[1],
                    scaling,
                )
                return out.view(hq, 1, d)
            if tq == 1 and mask is None:  # decode on other devices / dtypes: torch ops on the strided view
                qg = q.reshape(hkv, g, d)  # (Hkv, G, D)
                probs = torch.softmax(attention_logits(qg, keys, scaling, None), dim=-1)  # (Hkv, G, N)
                return torch.matmul(probs, vals).reshape(hq, 1, d)
            qg = q.view(hkv, g, tq, d)  # (Hkv, G, Tq, D); one (Tq, N) mask shared by the G heads
            # 4-D inputs (a batch of one): CPU SDPA took its fused kernel for them and the math path for
            # 3-D ones (3.2x slower measured on a 1,024-query chunk over 8K keys)
            keys4, vals4 = keys.unsqueeze(0), vals.unsqueeze(0)  # (1, Hkv, N, D)
            mask4 = None if mask is None else mask[None, None]  # (1, 1, Tq, N)
            outs = [
                F.scaled_dot_product_attention(qg[None, :, i], keys4, vals4, attn_mask=mask4, scale=scaling)[0]
                for i in range(g)
            ]
            return torch.stack(outs, dim=1).reshape(hq, tq, d)  # (Hkv, G, Tq, D) -> (Hq, Tq, D)
        qg = q.reshape(hkv, hq // hkv, tq, d)  # (Hkv, G, Tq, D)
        merged = merge_partials(
            [
                partial_attention(qg, keys.unsqueeze(1), vals.unsqueeze(1), scaling, mask)  # (Hkv, G, Tq, D)
                for keys, vals, mask in parts
            ]
        )
        return merged.reshape(hq, tq, d)

    def stats(self) -> LayerStats:
        pool, s = self.state.pool, self.spec
        page_bytes = 2 * s.num_kv_heads * self.state.page_size * s.head_dim * s.elem_bytes
        allocated = 0 if self.k is None else self.k.shape[1] * page_bytes
        return LayerStats(
            self.layer_idx,
            tokens_resident=pool.tokens_stored,
            bytes_resident=pool.pages_used * page_bytes,
            bytes_allocated=allocated,
        )

    def clear(self) -> None:
        self.state.reset()
        self.step = 0
        self.k = None
        self.v = None
