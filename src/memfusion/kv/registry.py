"""Policy names -> config classes: the one place strings become policies."""

from __future__ import annotations

import dataclasses
from typing import Any

from memfusion.errors import InvalidInput
from memfusion.kv.cca import CCA
from memfusion.kv.dense import Dense
from memfusion.kv.h2o import H2O
from memfusion.kv.paged import Paged
from memfusion.kv.policy import PolicyConfig
from memfusion.kv.quant import Quant
from memfusion.kv.quest import Quest
from memfusion.kv.snapkv import SnapKV
from memfusion.kv.tiered import Tiered
from memfusion.kv.window import Window

POLICIES: dict[str, type[PolicyConfig]] = {
    "dense": Dense,
    "paged": Paged,
    "window": Window,
    "snapkv": SnapKV,
    "h2o": H2O,
    "cca": CCA,
    "quest": Quest,
    "tiered": Tiered,
    "quant": Quant,
}


def resolve(policy: str | PolicyConfig, **params: Any) -> PolicyConfig:
    """A config from a name plus keyword parameters, or a config instance as it is."""
    if isinstance(policy, PolicyConfig):
        if params:
            raise InvalidInput(
                f"parameters {sorted(params)} given with a config instance; set them on the config instead"
            )
        return policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise InvalidInput(f"unknown KV policy {policy!r}; valid policies: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[policy]
    try:
        return cls(**params)
    except TypeError as exc:
        allowed = [f.name for f in dataclasses.fields(cls)]
        raise InvalidInput(
            f"bad parameters for policy {policy!r}: {exc}; allowed parameters: {', '.join(allowed) or 'none'}"
        ) from exc
