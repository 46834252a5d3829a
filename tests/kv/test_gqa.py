"""``to_gqa``: MHA -> GQA by mean-pooling K/V heads within each group."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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

import memfusion.kv as kv
from memfusion.errors import InvalidInput, UnsupportedModel

VOCAB, HEADS, D = 64, 4, 8
SMALL = dict(vocab_size=VOCAB, hidden_size=HEADS * D, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256)

MHA: dict[str, Callable[[], Any]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=False)),  # K/V biases
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)),
}


def _mha(family: str) -> Any:
    torch.manual_seed(0)
    return MHA[family]().eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@torch.no_grad()
def _duplicate_heads_within_groups(model: Any, group: int) -> None:
    """Make K/V heads ``[i * group, (i + 1) * group)`` copies of head ``i * group`` (weights and biases)."""
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            for t in [proj.weight] + ([proj.bias] if proj.bias is not None else []):
                for h in range(HEADS):
                    lead = (h // group) * group
                    t[h * D : (h + 1) * D] = t[lead * D : (lead + 1) * D].clone()


@pytest.mark.parametrize("family", sorted(MHA))
def test_same_number_of_heads_is_identity(family: str) -> None:
    model = _mha(family)
    out = kv.to_gqa(model, HEADS)
    assert out is not model
    assert torch.equal(_logits(out, _ids()), _logits(model, _ids()))


@pytest.mark.parametrize("family", sorted(MHA))
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_duplicated_heads_convert_exactly(family: str, kv_heads: int) -> None:
    model = _mha(family)
    _duplicate_heads_within_groups(model, HEADS // kv_heads)
    before = _logits(model, _ids())
    out = kv.to_gqa(model, kv_heads)
    assert out.config.num_key_value_heads == kv_heads
    assert out.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * D, HEADS * D)
    torch.testing.assert_close(_logits(out, _ids()), before, atol=1e-5, rtol=0)
    # the input model is unchanged
    assert model.config.num_key_value_heads == HEADS
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (HEADS * D, HEADS * D)
    torch.testing.assert_close(_logits(model, _ids()), before, atol=0, rtol=0)


def test_weights_are_group_means() -> None:
    model = _mha("qwen2")
    out = kv.to_gqa(model, 2)
    for old, new in zip(model.model.layers, out.model.layers, strict=True):
        for name in ("k_proj", "v_proj"):
            a, b = getattr(old.self_attn, name), getattr(new.self_attn, name)
            w = a.weight.detach()
            expected = torch.cat([(w[0:D] + w[D : 2 * D]) / 2, (w[2 * D : 3 * D] + w[3 * D : 4 * D]) / 2])
            torch.testing.assert_close(b.weight.detach(), expected, atol=1e-7, rtol=0)
            bias = a.bias.detach()
            expected_b = torch.cat([(bias[0:D] + bias[D : 2 * D]) / 2, (bias[2 * D : 3 * D] + bias[3 * D :]) / 2])
            torch.testing.assert_close(b.bias.detach(), expected_b, atol=1e-7, rtol=0)
        # Q and O projections are untouched
        assert torch.equal(old.self_attn.q_proj.weight, new.self_attn.q_proj.weight)
        assert torch.equal(old.self_attn.o_proj.weight, new.self_attn.o_proj.weight)


def test_gqa_to_fewer_heads_pools_consecutive_kv_heads() -> None:
    """An already-GQA model (4 query : 2 KV heads) -> MQA: both KV heads average into one."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_key_value_heads": 2})).eval()
    out = kv.to_gqa(model, 1)
    w = model.model.layers[1].self_attn.v_proj.weight.detach()
    torch.testing.assert_close(out.model.layers[1].self_attn.v_proj.weight.detach(), (w[:D] + w[D:]) / 2,
                               atol=1e-7, rtol=0)
    assert _logits(out, _ids()).shape == (2, 12, VOCAB)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    out = kv.to_gqa(_mha("llama"), 2)
    out.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_key_value_heads == 2
    torch.testing.assert_close(_logits(loaded, _ids()), _logits(out, _ids()), atol=1e-6, rtol=0)


def test_converted_model_runs_under_kv_generate() -> None:
    out = kv.to_gqa(_mha("mistral"), 2)
    ids = _ids()
    res = kv.generate(out, ids, "dense", max_new_tokens=4, prefill_chunk=5)
    ref = out.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(res.sequences, ref)
    assert res.cache.spec.num_kv_heads == 2


@pytest.mark.parametrize("bad", [3, 8, 0, -2, 2.0, True, "2", None])
def test_bad_num_kv_heads(bad: Any) -> None:
    with pytest.raises(InvalidInput, match="num_kv_heads"):
        kv.to_gqa(_mha("llama"), bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=1, num_attention_heads=4)),
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)),
        lambda: torch.nn.Linear(2, 2),
    ],
)
def test_unsupported_models_are_named(make: Callable[[], Any]) -> None:
    model = make()
    with pytest.raises(UnsupportedModel, match=type(model).__name__) as info:
        kv.to_gqa(model, 2)
    assert "LlamaForCausalLM" in str(info.value)
