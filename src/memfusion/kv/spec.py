"""What a KV policy needs to know about a model, read once from its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memfusion.errors import UnsupportedModel

# Architectures whose attention goes through `ALL_ATTENTION_FUNCTIONS` and `Cache.update(k, v,
# layer_idx)` in transformers 5 and that the test matrix covers.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "GPTNeoXForCausalLM",
    "GPT2LMHeadModel",
)


@dataclass(frozen=True)
class ModelSpec:
    """Attention geometry of a causal LM.

    ``num_kv_heads`` is the number of K/V heads actually stored (``num_heads`` for MHA models);
    storage never expands K/V to query heads.
    """

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def groups(self) -> int:
        """Query heads per KV head (``G``)."""
        return self.num_heads // self.num_kv_heads

    @property
    def elem_bytes(self) -> int:
        return self.dtype.itemsize  # (a tensor's element_size() would allocate one: ~8 us per decode step)

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V for one token of one sequence in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.elem_bytes

    @classmethod
    def from_model(cls, model: Any) -> ModelSpec:
        name = type(model).__name__
        if name not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"{name} is not supported by memfusion.kv; supported architectures: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}. Load the checkpoint with one of these classes "
                "or open an issue for the architecture."
            )
        cfg = model.config
        num_heads = int(cfg.num_attention_heads)
        num_kv = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        param = next(model.parameters())
        return cls(
            architecture=name,
            num_layers=int(cfg.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            dtype=param.dtype,
            device=param.device,
        )
