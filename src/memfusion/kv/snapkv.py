"""``snapkv``: keep what an observation window of the last queries attends to (SnapKV, arXiv 2404.14469).

Rules, per KV head:

- a forward of more than one token (a prefill chunk) is an *observation*: each resident token's
  score becomes the attention it receives from the chunk's last ``min(obs_window, Tq)`` real
  queries, summed over the KV head's query heads, then average-pooled along the resident tokens
  in position order (kernel ``pool_kernel``, zero padding, as SnapKV's ``avg_pool1d``); the newest
  ``obs_window`` tokens are left out of the pooling (their votes count as 0), as SnapKV pools the
  prefix only. Scores from earlier chunks are replaced.
- a one-token forward (decode) adds that query's attention (summed over query heads, not pooled)
  to the scores, so tokens that keep being read survive; memory stays at ``budget``.
- the newest ``obs_window`` real tokens are always kept; the rest are kept by score, up to
  ``budget`` tokens in all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memfusion.kv.policy import INF, EvictingLayer, KVLayer, PolicyConfig, TokenStore, require, require_int
from memfusion.kv.spec import ModelSpec


@dataclass(frozen=True)
class SnapKV(PolicyConfig):
    """``budget`` tokens per KV head, ``obs_window`` of them the newest; ``pool_kernel`` odd."""

    budget: int = 1024
    obs_window: int = 32
    pool_kernel: int = 7
    name = "snapkv"
    bounded = True

    def __post_init__(self) -> None:
        require_int(self.budget, "budget", 1)
        require_int(self.obs_window, "obs_window", 1)
        require(
            self.obs_window <= self.budget,
            f"obs_window must be <= budget ({self.budget}): the window is always kept; got {self.obs_window}",
        )
        require_int(self.pool_kernel, "pool_kernel", 1)
        require(self.pool_kernel % 2 == 1, f"pool_kernel must be odd (1 = no pooling), got {self.pool_kernel}")

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        return SnapKVLayer(layer_idx, spec, self)

    def analytic_tokens(self, seen: int) -> int:
        return min(seen, self.budget)


class SnapKVLayer(EvictingLayer):
    uses_probs = True

    def __init__(self, layer_idx: int, spec: ModelSpec, cfg: SnapKV) -> None:
        super().__init__(layer_idx, spec)
        self.cfg = cfg

    def capacity(self) -> int:
        return self.cfg.budget

    def setup(self, store: TokenStore) -> None:
        store.add_field("votes", torch.float32)

    def _window(self) -> torch.Tensor:
        assert self.store is not None
        return self.store["pos"] > self.newest_pos() - self.cfg.obs_window  # (B, Hkv, n)

    def observe(self, probs: torch.Tensor | None, tq: int) -> None:
        assert self.store is not None and probs is not None
        votes = self.store["votes"]  # (B, Hkv, n), a view
        if tq == 1:
            votes.add_(self.received(probs))
            return
        fresh = self.received(probs, last=self.cfg.obs_window).float().masked_fill(self._window(), 0.0)
        order = self.store["pos"].argsort(dim=-1)  # (B, Hkv, n): resident tokens in position order
        b, h, n = fresh.shape
        k = self.cfg.pool_kernel
        ordered = fresh.gather(2, order).view(b * h, 1, n)  # (B*Hkv, 1, n)
        pooled = F.avg_pool1d(ordered, k, stride=1, padding=k // 2).view(b, h, n)  # (B, Hkv, n)
        votes.scatter_(2, order, pooled)

    def score(self) -> torch.Tensor:
        assert self.store is not None
        st = self.store
        return torch.where(st["valid"], torch.where(self._window(), INF, st["votes"]), -INF)
