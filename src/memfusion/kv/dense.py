"""``dense``: keep every token; the reference every other policy is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from memfusion.kv.policy import EvictingLayer, KVLayer, PolicyConfig
from memfusion.kv.spec import ModelSpec


@dataclass(frozen=True)
class Dense(PolicyConfig):
    """Every token in a preallocated, doubling buffer (no O(T) copy per decoded token)."""

    name = "dense"

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        return EvictingLayer(layer_idx, spec)
