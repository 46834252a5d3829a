"""``window``: the last ``window`` tokens plus the first ``sinks`` (StreamingLLM, arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfusion.kv.policy import INF, EvictingLayer, KVLayer, PolicyConfig, require, require_int
from memfusion.kv.spec import ModelSpec


@dataclass(frozen=True)
class Window(PolicyConfig):
    """``sinks=0`` is a plain sliding window. Positions count real tokens (padding excluded)."""

    window: int = 1024
    sinks: int = 4
    name = "window"
    bounded = True

    def __post_init__(self) -> None:
        require_int(self.window, "window", 0)
        require_int(self.sinks, "sinks", 0)
        require(self.window + self.sinks > 0, "window + sinks must be > 0 (the cache would keep nothing)")

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        return WindowLayer(layer_idx, spec, self)

    def analytic_tokens(self, seen: int) -> int:
        return min(seen, self.window + self.sinks)


class WindowLayer(EvictingLayer):
    def __init__(self, layer_idx: int, spec: ModelSpec, cfg: Window) -> None:
        super().__init__(layer_idx, spec)
        self.cfg = cfg

    def capacity(self) -> int:
        return self.cfg.window + self.cfg.sinks

    def score(self) -> torch.Tensor:
        assert self.store is not None
        pos = self.store["pos"].to(torch.float32)  # (B, Hkv, n): recency
        pos = torch.where(pos < self.cfg.sinks, INF, pos)
        return torch.where(self.store["valid"], pos, -INF)
