"""Tiny models of each family the KV policies must support, built from configs (fp32, eval)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=2048)


def _llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2))


def _qwen2() -> torch.nn.Module:
    return Qwen2ForCausalLM(
        Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=1, use_sliding_window=False)
    )


def _mistral() -> torch.nn.Module:
    return MistralForCausalLM(
        MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    )


def _neox() -> torch.nn.Module:
    cfg = GPTNeoXConfig(**COMMON, num_attention_heads=4, rotary_pct=0.5)
    return GPTNeoXForCausalLM(cfg)


def _gpt2() -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=2048, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg)


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2": _gpt2,  # MHA, learned absolute positions
    "llama": _llama,  # GQA 4:2
    "qwen2": _qwen2,  # MQA 4:1
    "mistral": _mistral,
    "neox": _neox,  # MHA
}
_CACHE: dict[str, torch.nn.Module] = {}


def build(family: str) -> torch.nn.Module:
    if family not in _CACHE:
        torch.manual_seed(1234)
        _CACHE[family] = FAMILIES[family]().eval()
    return _CACHE[family]


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return build(request.param)


@pytest.fixture
def llama() -> torch.nn.Module:
    return build("llama")


def prompts(batch: int, length: int, seed: int = 0, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``(batch, length)`` and a left-padding mask; row 1 loses ``pad`` tokens on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, mask
