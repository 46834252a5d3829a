"""``cca``: core-context-aware attention, training-free form (CCA-Attention, arXiv 2412.12465).

Per KV head, the newest ``local`` real tokens stay exact. Older exact tokens are taken oldest
first (by position) in groups of ``group_size``; each full group is pooled into one *core
token*::

    w_i    = a_i / sum_j a_j        (a_i: attention token i has received so far, summed over
                                     the KV head's query heads and every real query; uniform
                                     when the group received none)
    k_core = sum_i w_i k_i,   v_core = sum_i w_i v_i,   count = group_size

and every query then attends to a core with the logit bias ``log(count)``, so a core weighs like
``count`` keys of logit ``q . k_core`` (the group's share of the softmax mass). The paper picks
``w`` from the group's last query; we use the attention received, which this cache observes.
Leftover exact tokens (fewer than a group) wait for the next ones. Memory grows by one core per
``group_size`` tokens: the policy is not bounded.

Invariants of the store (besides :class:`TokenStore`'s): ``count`` is 1 for an exact token and
``group_size`` for a core; a core is never pooled again; a core's ``pos`` is its newest member's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfusion.kv.policy import EvictingLayer, KVLayer, PolicyConfig, TokenStore, require_int
from memfusion.kv.spec import ModelSpec


@dataclass(frozen=True)
class CCA(PolicyConfig):
    """``group_size >= 2`` tokens per core; the newest ``local >= 0`` tokens are kept exact."""

    group_size: int = 16
    local: int = 1024
    name = "cca"

    def __post_init__(self) -> None:
        require_int(self.group_size, "group_size", 2)
        require_int(self.local, "local", 0)

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        return CCALayer(layer_idx, spec, self)

    def analytic_tokens(self, seen: int) -> int:
        old = max(0, seen - self.local)
        return min(seen, self.local) + old // self.group_size + old % self.group_size


class CCALayer(EvictingLayer):
    uses_probs = True

    def __init__(self, layer_idx: int, spec: ModelSpec, cfg: CCA) -> None:
        super().__init__(layer_idx, spec)
        self.cfg = cfg
        self.has_cores = False

    def setup(self, store: TokenStore) -> None:
        store.add_field("imp", torch.float32)
        store.add_field("count", torch.float32, fill=1.0)

    def key_bias(self) -> torch.Tensor | None:
        assert self.store is not None
        return self.store["count"].log() if self.has_cores else None  # (B, Hkv, n)

    def observe(self, probs: torch.Tensor | None, tq: int) -> None:
        assert self.store is not None and probs is not None
        self.store["imp"].add_(self.received(probs))
        self.pool_groups()

    def pool_groups(self) -> None:
        """Pool every full group of old exact tokens into a core (in place, then compact)."""
        assert self.store is not None and self.real_seen is not None
        st, gs = self.store, self.cfg.group_size
        pos, valid = st["pos"], st["valid"]
        limit = (self.real_seen - self.cfg.local).view(-1, 1, 1)  # (B, 1, 1)
        cand = valid & (st["count"] == 1) & (pos < limit)  # (B, Hkv, n): old exact tokens
        groups = cand[:, 0].sum(dim=-1) // gs  # (B,): same for every KV head
        g = int(groups.max()) if groups.numel() else 0
        if g == 0:
            return
        b, h, _ = pos.shape
        key = torch.where(cand, pos, torch.iinfo(torch.int64).max)
        members = key.argsort(dim=-1, stable=True)[:, :, : g * gs].reshape(b, h, g, gs)  # (B, Hkv, g, gs)
        used = (torch.arange(g, device=pos.device) < groups.view(-1, 1, 1)).expand(b, h, g)  # (B, Hkv, g)
        flat = members.reshape(b, h, g * gs)  # (B, Hkv, g*gs)
        imp = st["imp"].gather(2, flat).view(b, h, g, gs)  # (B, Hkv, g, gs)
        total = imp.sum(dim=-1, keepdim=True)  # (B, Hkv, g, 1)
        w = torch.where(total > 0, imp / total.clamp_min(torch.finfo(imp.dtype).tiny), 1.0 / gs)
        dst = members[..., 0]  # (B, Hkv, g): a core takes its oldest member's slot
        for name in ("k", "v"):
            t = st[name]  # (B, Hkv, n, D)
            d = t.shape[-1]
            x = t.gather(2, flat.unsqueeze(-1).expand(b, h, g * gs, d)).view(b, h, g, gs, d).float()
            core = (w.unsqueeze(-1) * x).sum(dim=3).to(t.dtype)  # (B, Hkv, g, D)
            idx = dst.unsqueeze(-1).expand(b, h, g, d)
            t.scatter_(2, idx, torch.where(used.unsqueeze(-1), core, t.gather(2, idx)))
        newest = pos.gather(2, flat).view(b, h, g, gs).amax(dim=-1)  # (B, Hkv, g)
        for name, value in (("imp", total.squeeze(-1)), ("count", torch.full_like(total.squeeze(-1), gs)),
                            ("pos", newest)):
            st[name].scatter_(2, dst, torch.where(used, value, st[name].gather(2, dst)))
        rest = members[..., 1:].reshape(b, h, g * (gs - 1))  # (B, Hkv, g*(gs-1)): pooled away
        keep_rest = valid.gather(2, rest) & ~used.repeat_interleave(gs - 1, dim=2)
        valid.scatter_(2, rest, keep_rest)
        self.has_cores = True
        # Drop the invalid entries (pooled members, padding): as many per row as every row has.
        invalid = ~st["valid"]  # (B, Hkv, n)
        e = int(invalid.sum(dim=-1).min())
        st.evict(torch.topk(invalid.to(torch.float32), e, dim=-1).indices)  # (B, Hkv, e)

    def clear(self) -> None:
        super().clear()
        self.has_cores = False
