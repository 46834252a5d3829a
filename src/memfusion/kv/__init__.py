"""Internal memory: KV-cache policies for Hugging Face causal LMs.

``generate(model, input_ids, policy="quest", token_budget=1024)`` runs greedy generation under a
policy; ``make_cache`` + ``attach`` is the lower-level path for your own ``model.generate`` or
forward loop. ``POLICIES`` maps each policy name to its config class. Importing this package
patches nothing.
"""

from __future__ import annotations

from memfusion.kv.generate import GenerateResult, generate
from memfusion.kv.gqa import to_gqa
from memfusion.kv.hf import MemfusionCache, attach, cache_kwarg, make_cache
from memfusion.kv.policy import PolicyConfig
from memfusion.kv.registry import POLICIES, resolve
from memfusion.kv.spec import SUPPORTED_ARCHITECTURES, ModelSpec
from memfusion.kv.stats import KVStats, LayerStats

__all__ = [
    "POLICIES",
    "SUPPORTED_ARCHITECTURES",
    "GenerateResult",
    "KVStats",
    "LayerStats",
    "MemfusionCache",
    "ModelSpec",
    "PolicyConfig",
    "attach",
    "cache_kwarg",
    "generate",
    "make_cache",
    "resolve",
    "to_gqa",
]
