"""``h2o``: heavy hitters by accumulated attention plus the recent tokens (H2O, arXiv 2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfusion.kv.policy import INF, EvictingLayer, KVLayer, PolicyConfig, TokenStore, require, require_int
from memfusion.kv.spec import ModelSpec


@dataclass(frozen=True)
class H2O(PolicyConfig):
    """At most ``budget`` tokens per KV head: the newest ``recent`` plus the heavy hitters.

    A token's score is the attention it has received so far, summed over its KV head's query
    heads and every real query since it arrived (prefill chunks and decode steps alike).
    """

    budget: int = 1024
    recent: int = 64
    name = "h2o"
    bounded = True

    def __post_init__(self) -> None:
        require_int(self.budget, "budget", 1)
        require_int(self.recent, "recent", 0)
        require(self.recent <= self.budget, f"recent must be <= budget ({self.budget}), got {self.recent}")

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        return H2OLayer(layer_idx, spec, self)

    def analytic_tokens(self, seen: int) -> int:
        return min(seen, self.budget)


class H2OLayer(EvictingLayer):
    uses_probs = True

    def __init__(self, layer_idx: int, spec: ModelSpec, cfg: H2O) -> None:
        super().__init__(layer_idx, spec)
        self.cfg = cfg

    def capacity(self) -> int:
        return self.cfg.budget

    def setup(self, store: TokenStore) -> None:
        store.add_field("acc", torch.float32)

    def observe(self, probs: torch.Tensor | None, tq: int) -> None:
        assert self.store is not None and probs is not None
        self.store["acc"].add_(self.received(probs))  # (B, Hkv, n)

    def score(self) -> torch.Tensor:
        assert self.store is not None
        st = self.store
        recent = st["pos"] > self.newest_pos() - self.cfg.recent  # (B, Hkv, n)
        return torch.where(st["valid"], torch.where(recent, INF, st["acc"]), -INF)
