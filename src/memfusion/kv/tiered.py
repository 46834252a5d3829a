"""``tiered``: a full-precision hot window over a paged cold tier (InfLLM-style offload, arXiv 2402.04617).

Per layer and sequence, the last ``window`` token slots stay *hot* (resident, full precision).
Real tokens leaving the window go, in position order, to a resident *staging* buffer; every full
page of ``page_size`` staged tokens moves to the *cold* tier (CPU memory, or files under
``cold_dir``) and leaves one *representative key* resident: the mean of the page's keys per KV
head (InfLLM picks the keys that received the most attention; the mean needs no attention
scores and is what Quest/InfLLM-style page scoring reduces to for one representative).
Padding slots are dropped when they leave the window: they never reach staging or the cold tier.

Each step scores every cold page of a (sequence, KV head) by ``max`` over the group's query
heads and the chunk's real queries of ``q · rep * scaling``, fetches the ``retrieve_pages`` best
pages and attends over hot ∪ staging ∪ retrieved with an exact softmax merge. Cold pages are
older than any new token, so only the hot part carries the causal mask of the chunk.

Memory (per layer and sequence, ``e`` real tokens evicted so far, ``C = e // page_size``):
resident = ``(hot + e % page_size)`` tokens of K/V + ``C`` representative keys per KV head;
offloaded = ``C * page_size`` tokens of K/V. Retrieved pages are transient copies freed after
the step, so they are not counted. The representative keys grow as ``T / page_size``; everything
else resident is bounded by the config (the policy counts as ``bounded``).
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from memfusion.kv.attention import logit_mask, merge_partials, partial_attention
from memfusion.kv.policy import KVLayer, PolicyConfig, TokenStore, advance_positions, require, require_int
from memfusion.kv.spec import ModelSpec
from memfusion.kv.stats import LayerStats


@dataclass(frozen=True)
class Tiered(PolicyConfig):
    """``window`` hot slots; cold pages of ``page_size`` tokens; ``retrieve_pages`` fetched per step.

    ``cold_dir=None`` keeps the cold tier in CPU tensors; a directory keeps it in two files per
    layer (K and V, ``memfusion-tiered-*.bin``) that grow by pages and are deleted by
    ``clear()`` / ``cache.reset()`` or when the cache is garbage-collected.
    ``pages_selected`` / ``pages_total`` count every attention step, prefill chunks included.
    """

    window: int = 1024
    page_size: int = 16
    retrieve_pages: int = 4
    cold_dir: str | None = None
    name = "tiered"
    bounded = True

    def __post_init__(self) -> None:
        require_int(self.window, "window", 1)
        require_int(self.page_size, "page_size", 1)
        require_int(self.retrieve_pages, "retrieve_pages", 0)
        if self.cold_dir is not None:
            require(
                isinstance(self.cold_dir, str) and os.path.isdir(self.cold_dir) and os.access(self.cold_dir, os.W_OK),
                "cold_dir must be the str path of an existing writable directory, or None (CPU memory); "
                f"got {self.cold_dir!r}",
            )

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        return TieredLayer(layer_idx, spec, self)

    def _split(self, seen: int) -> tuple[int, int, int]:
        """``(hot, staged, cold_pages)`` per sequence after ``seen`` real tokens (no padding)."""
        hot = min(seen, self.window)
        evicted = seen - hot
        return hot, evicted % self.page_size, evicted // self.page_size

    def analytic_tokens(self, seen: int) -> int:
        hot, staged, _ = self._split(seen)
        return hot + staged

    def analytic_bytes(self, seen: int, spec: ModelSpec, batch: int = 1) -> int:
        _, _, pages = self._split(seen)
        rep = pages * spec.num_kv_heads * spec.head_dim * spec.elem_bytes
        return batch * spec.num_layers * (self.analytic_tokens(seen) * spec.token_bytes + rep)

    def analytic_offloaded_bytes(self, seen: int, spec: ModelSpec, batch: int = 1) -> int:
        """Exact ``bytes_offloaded`` after ``seen`` real tokens, all layers, no padding."""
        _, _, pages = self._split(seen)
        return batch * spec.num_layers * pages * self.page_size * spec.token_bytes


# --- the cold tier ------------------------------------------------------------------------------


class ColdTier(Protocol):
    """Page storage ``(pages, B, Hkv, P, D)`` for K and V, outside the resident tier.

    Invariant: page ``p`` of sequence ``b`` is meaningful only for ``p <`` that sequence's cold
    page count (kept by the layer); capacity only grows.
    """

    def write(self, page: torch.Tensor, row: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store pages: ``page``/``row (N,)`` int64, ``k``/``v (N, Hkv, P, D)``."""

    def read(self, page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``page (B, Hkv, R)`` -> K, V ``(B, Hkv, R, P, D)`` (CPU tensors)."""

    def close(self) -> None:
        """Release the storage (delete files)."""


def _index(page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advanced indices for ``store[page, row, head]`` from ``page (B, Hkv, R)``."""
    b, h, _ = page.shape
    return page, torch.arange(b).view(b, 1, 1), torch.arange(h).view(1, h, 1)


class MemoryCold:
    """Cold pages in CPU tensors, capacity doubling along the page axis."""

    def __init__(self, batch: int, spec: ModelSpec, page_size: int) -> None:
        self.shape = (batch, spec.num_kv_heads, page_size, spec.head_dim)
        self.k = torch.empty(0, *self.shape, dtype=spec.dtype)  # (pages, B, Hkv, P, D)
        self.v = torch.empty_like(self.k)

    def _reserve(self, pages: int) -> None:
        if pages > self.k.shape[0]:
            cap = max(pages, 2 * self.k.shape[0], 4)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.zeros(cap, *self.shape, dtype=old.dtype)
                new[: old.shape[0]] = old
                setattr(self, name, new)

    def write(self, page: torch.Tensor, row: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._reserve(int(page.max()) + 1)
        page, row = page.cpu(), row.cpu()
        self.k[page, row] = k.cpu()  # (N, Hkv, P, D) into (pages, B, Hkv, P, D)
        self.v[page, row] = v.cpu()

    def read(self, page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _index(page.cpu())
        return self.k[idx], self.v[idx]

    def close(self) -> None:
        self.k = self.v = torch.empty(0, *self.shape, dtype=self.k.dtype)


_RAW = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # element size -> raw numpy dtype


def _unlink(paths: list[str]) -> None:
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


class FileCold:
    """Cold pages in two ``np.memmap`` files (K, V) under ``cold_dir``, grown by truncate + remap.

    Elements are stored as raw integers of the model dtype's size (bfloat16 has no numpy
    dtype). The files are removed by :meth:`close` or, failing that, when this object is
    garbage-collected.
    """

    def __init__(self, batch: int, spec: ModelSpec, page_size: int, cold_dir: str, layer_idx: int) -> None:
        self.shape = (batch, spec.num_kv_heads, page_size, spec.head_dim)
        self.dtype = spec.dtype
        self.raw = _RAW[spec.elem_bytes]
        self.torch_raw = torch.from_numpy(np.zeros(0, dtype=self.raw)).dtype
        self.paths: list[str] = []
        for part in ("k", "v"):
            fd, path = tempfile.mkstemp(prefix=f"memfusion-tiered-L{layer_idx}-{part}-", suffix=".bin", dir=cold_dir)
            os.close(fd)
            self.paths.append(path)
        self._finalizer = weakref.finalize(self, _unlink, list(self.paths))
        self.cap = 0
        self.maps: list[np.memmap] = []

    def _reserve(self, pages: int) -> None:
        if pages <= self.cap:
            return
        cap = max(pages, 2 * self.cap, 4)
        size = cap * int(np.prod(self.shape)) * np.dtype(self.raw).itemsize
        for m in self.maps:
            m.flush()
        self.maps = []
        for path in self.paths:
            with open(path, "r+b") as f:
                f.truncate(size)
            self.maps.append(np.memmap(path, dtype=self.raw, mode="r+", shape=(cap, *self.shape)))
        self.cap = cap

    def write(self, page: torch.Tensor, row: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._reserve(int(page.max()) + 1)
        p, r = page.cpu().numpy(), row.cpu().numpy()
        for m, t in zip(self.maps, (k, v), strict=True):
            m[p, r] = t.detach().cpu().contiguous().view(self.torch_raw).numpy()

    def read(self, page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = tuple(i.numpy() for i in _index(page.cpu()))
        k, v = (torch.from_numpy(np.ascontiguousarray(m[idx])).view(self.dtype) for m in self.maps)
        return k, v

    def close(self) -> None:
        self.maps = []
        self._finalizer()


# --- the layer ---------------------------------------------------------------------------------


class TieredLayer(KVLayer):
    """Hot :class:`TokenStore` + staging + representative keys (resident) over a :class:`ColdTier`.

    Invariants, per sequence ``b`` (the same for each of its KV heads): ``cold[b]`` pages hold its
    real tokens at positions ``[0, cold[b] * P)`` in order, page ``j`` = positions
    ``[j * P, (j + 1) * P)``; ``staged[b] < P`` tokens (positions ``cold[b] * P + i``) fill staging
    slots ``[0, staged[b])``; the hot store holds the rest, ``<= window`` slots after each step;
    ``rep[b, :, j]`` is the mean key of cold page ``j``.
    """

    def __init__(self, layer_idx: int, spec: ModelSpec, cfg: Tiered) -> None:
        super().__init__(layer_idx, spec)
        self.cfg = cfg
        self._empty()

    def _empty(self) -> None:
        self.hot: TokenStore | None = None
        self.real_seen = torch.zeros(0, dtype=torch.int64)
        self.stage_k = self.stage_v = torch.empty(0)
        self.staged = torch.zeros(0, dtype=torch.int64)  # (B,)
        self.cold_count = torch.zeros(0, dtype=torch.int64)  # (B,)
        self.rep = torch.empty(0)  # (B, Hkv, capacity, D)
        self.cold: MemoryCold | FileCold | None = None
        self.pages_selected = 0
        self.pages_total = 0
        #: the pages fetched at the last step, ``(B, Hkv, R)``, -1 where nothing was fetched.
        self.last_selected: torch.Tensor | None = None

    def _init(self, b: int) -> None:
        s, p, dev = self.spec, self.cfg.page_size, self.spec.device
        self.hot = TokenStore(b, s, limit=self.cfg.window)
        self.real_seen = torch.zeros(b, dtype=torch.int64, device=dev)
        self.stage_k = torch.zeros(b, s.num_kv_heads, p, s.head_dim, dtype=s.dtype, device=dev)  # (B, Hkv, P, D)
        self.stage_v = torch.zeros_like(self.stage_k)
        self.staged = torch.zeros(b, dtype=torch.int64, device=dev)
        self.cold_count = torch.zeros(b, dtype=torch.int64, device=dev)
        self.rep = torch.zeros(b, s.num_kv_heads, 0, s.head_dim, dtype=s.dtype, device=dev)
        if self.cfg.cold_dir is None:
            self.cold = MemoryCold(b, s, p)
        else:
            self.cold = FileCold(b, s, p, self.cfg.cold_dir, self.layer_idx)

    # --- one step -------------------------------------------------------------------------
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        b, hq, tq, d = q.shape
        hkv = self.spec.num_kv_heads
        g = hq // hkv
        if self.hot is None:
            self._init(b)
        hot = self.hot
        assert hot is not None
        pos, self.real_seen = advance_positions(self.real_seen, valid)  # (B, Tq), (B,)
        hot.append(k, v, pos, valid)

        qg = q.reshape(b, hkv, g * tq, d)  # (B, Hkv, G*Tq, D): rows are (query head, token)
        mask = logit_mask(hot["valid"], None, tq, hot.n, tq, q.device, q.dtype)  # (B, Hkv, Tq, N)
        assert mask is not None
        mask = mask.unsqueeze(2).expand(b, hkv, g, tq, hot.n).reshape(b, hkv, g * tq, hot.n)  # (B, Hkv, G*Tq, N)
        parts = [partial_attention(qg, hot["k"], hot["v"], scaling, mask)]
        side = self._side_keys(qg.view(b, hkv, g, tq, d), valid, scaling)
        if side is not None:
            sk, sv, smask = side
            parts.append(partial_attention(qg, sk, sv, scaling, smask))
        out = merge_partials(parts)  # (B, Hkv, G*Tq, D)
        self._evict()
        return out.reshape(b, hq, tq, d).transpose(1, 2)  # (B, Tq, Hq, D)

    def select(self, qg: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        """Top ``retrieve_pages`` cold pages per (sequence, KV head), ``(B, Hkv, R)``; -1: none.

        ``qg (B, Hkv, G, Tq, D)``; a page's score is the max over the G query heads and the
        chunk's real queries of ``q · rep * scaling``.
        """
        c = int(self.cold_count.max())
        r = min(self.cfg.retrieve_pages, c)
        b, hkv = qg.shape[:2]
        if r == 0:
            return torch.full((b, hkv, 0), -1, dtype=torch.int64, device=qg.device)
        rep = self.rep[:, :, :c]  # (B, Hkv, C, D)
        logits = torch.einsum("bhgtd,bhcd->bhgtc", qg, rep) * scaling  # (B, Hkv, G, Tq, C)
        logits = logits.masked_fill(~valid.view(b, 1, 1, -1, 1), float("-inf"))
        score = logits.amax(dim=(2, 3))  # (B, Hkv, C)
        exists = torch.arange(c, device=qg.device) < self.cold_count.view(b, 1, 1)  # (B, 1, C)
        score = score.masked_fill(~exists, float("-inf"))
        idx = torch.topk(score, r, dim=-1).indices  # (B, Hkv, R)
        return torch.where(idx < self.cold_count.view(b, 1, 1), idx, -1)

    def _side_keys(
        self, qg: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Staging + retrieved cold pages as one key set: K, V ``(B, Hkv, M, D)``, mask ``(B, Hkv|1, 1, M)``."""
        b, hkv = qg.shape[:2]
        p, dev = self.cfg.page_size, qg.device
        sel = self.select(qg, valid, scaling)  # (B, Hkv, R)
        self.last_selected = sel
        self.pages_selected += int((sel >= 0).sum())
        self.pages_total += int(self.cold_count.sum()) * hkv
        if int(self.staged.max()) == 0 and not bool((sel >= 0).any()):
            return None
        inf = torch.tensor(float("-inf"), dtype=qg.dtype, device=dev)
        zero = torch.zeros((), dtype=qg.dtype, device=dev)
        stage_ok = torch.arange(p, device=dev) < self.staged.view(b, 1, 1)  # (B, 1, P)
        keys, vals = [self.stage_k], [self.stage_v]
        masks = [torch.where(stage_ok, zero, inf).expand(b, hkv, p)]  # (B, Hkv, P)
        r = sel.shape[-1]
        if r:
            assert self.cold is not None
            ck, cv = self.cold.read(sel.clamp_min(0))  # (B, Hkv, R, P, D)
            got = (sel >= 0).view(b, hkv, r, 1, 1).cpu()
            ck, cv = ck.where(got, 0), cv.where(got, 0)  # no stale page (NaN garbage) reaches the logits
            keys.append(ck.to(dev).reshape(b, hkv, r * p, -1))  # (B, Hkv, R*P, D)
            vals.append(cv.to(dev).reshape(b, hkv, r * p, -1))
            page_ok = (sel >= 0).unsqueeze(-1).expand(b, hkv, r, p).reshape(b, hkv, r * p)  # (B, Hkv, R*P)
            masks.append(torch.where(page_ok, zero, inf))
        mask = torch.cat(masks, dim=-1).unsqueeze(2)  # (B, Hkv, 1, M)
        return torch.cat(keys, dim=2), torch.cat(vals, dim=2), mask

    # --- eviction: hot -> staging -> cold -------------------------------------------------
    def _evict(self) -> None:
        hot = self.hot
        assert hot is not None
        e = hot.n - self.cfg.window
        if e <= 0:
            return
        b, hkv, d = hot.batch, self.spec.num_kv_heads, self.spec.head_dim
        pos0 = hot["pos"][:, 0]  # (B, n): positions are the same for every KV head
        idx = torch.topk(pos0, e, dim=-1, largest=False, sorted=True).indices  # (B, e): oldest first, padding first
        gidx = idx.view(b, 1, e, 1).expand(b, hkv, e, d)
        k_out, v_out = hot["k"].gather(2, gidx), hot["v"].gather(2, gidx)  # (B, Hkv, e, D)
        real = pos0.gather(1, idx) >= 0  # (B, e)
        hot.evict(idx.unsqueeze(1).expand(b, hkv, e))
        self._stage(k_out, v_out, real)

    def _stage(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> None:
        """Append evicted tokens ``k``/``v (B, Hkv, e, D)`` (``real (B, e)``, in position order) to staging."""
        b, hkv, e, d = k.shape
        p, dev = self.cfg.page_size, k.device
        size = 2 * p + e  # staging + new tokens, room for the gather below; slot `size` is a dump
        comb_k = torch.zeros(b, hkv, size + 1, d, dtype=k.dtype, device=dev)  # (B, Hkv, 2P+e+1, D)
        comb_v = torch.zeros_like(comb_k)
        comb_k[:, :, :p], comb_v[:, :, :p] = self.stage_k, self.stage_v
        dst = torch.where(real, self.staged.unsqueeze(1) + real.long().cumsum(dim=1) - 1, size)  # (B, e)
        didx = dst.view(b, 1, e, 1).expand(b, hkv, e, d)
        comb_k.scatter_(2, didx, k)
        comb_v.scatter_(2, didx, v)
        total = self.staged + real.sum(dim=1)  # (B,)
        full = total // p  # (B,) new cold pages per sequence
        fmax = int(full.max())
        if fmax:
            self._to_cold(comb_k[:, :, : fmax * p], comb_v[:, :, : fmax * p], full)
        sidx = (full * p).view(b, 1, 1, 1) + torch.arange(p, device=dev).view(1, 1, p, 1)  # (B, 1, P, 1)
        self.stage_k = comb_k.gather(2, sidx.expand(b, hkv, p, d))  # (B, Hkv, P, D)
        self.stage_v = comb_v.gather(2, sidx.expand(b, hkv, p, d))
        self.staged = total - full * p
        self.cold_count = self.cold_count + full

    def _to_cold(self, k: torch.Tensor, v: torch.Tensor, full: torch.Tensor) -> None:
        """Move pages ``k``/``v (B, Hkv, F*P, D)`` (the first ``full[b]`` of row b are real) out."""
        b, hkv, fp, d = k.shape
        p = self.cfg.page_size
        f = fp // p
        kp = k.view(b, hkv, f, p, d).transpose(1, 2)  # (B, F, Hkv, P, D)
        vp = v.view(b, hkv, f, p, d).transpose(1, 2)
        ok = torch.arange(f, device=k.device).view(1, f) < full.view(b, 1)  # (B, F)
        page = self.cold_count.view(b, 1) + torch.arange(f, device=k.device).view(1, f)  # (B, F)
        row = torch.arange(b, device=k.device).view(b, 1).expand(b, f)
        page, row, kp, vp = page[ok], row[ok], kp[ok], vp[ok]  # (N,), (N,), (N, Hkv, P, D)
        assert self.cold is not None
        self.cold.write(page, row, kp, vp)
        need = int((self.cold_count + full).max())
        if need > self.rep.shape[2]:
            grown = torch.zeros(b, hkv, max(need, 2 * self.rep.shape[2]), d, dtype=self.rep.dtype, device=k.device)
            grown[:, :, : self.rep.shape[2]] = self.rep
            self.rep = grown  # (B, Hkv, capacity, D)
        self.rep[row, :, page] = kp.float().mean(dim=2).to(self.rep.dtype)  # (N, Hkv, D)

    # --- figures --------------------------------------------------------------------------
    def stats(self) -> LayerStats:
        hot = self.hot
        if hot is None:
            return LayerStats(self.layer_idx)
        s = self.spec
        staged, pages = int(self.staged.sum()), int(self.cold_count.sum())
        rep_bytes = pages * s.num_kv_heads * s.head_dim * s.elem_bytes
        buf = sum(t.numel() * t.element_size() for t in (self.stage_k, self.stage_v, self.rep))
        return LayerStats(
            self.layer_idx,
            tokens_resident=hot.batch * hot.n + staged,
            bytes_resident=hot.payload_bytes() + staged * s.token_bytes + rep_bytes,
            bytes_allocated=hot.allocated_bytes() + buf,
            bytes_offloaded=pages * self.cfg.page_size * s.token_bytes,
            pages_selected=self.pages_selected,
            pages_total=self.pages_total,
        )

    def clear(self) -> None:
        if self.cold is not None:
            self.cold.close()
        self._empty()
