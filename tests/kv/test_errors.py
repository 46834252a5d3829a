"""Bad input gets memfusion.errors types with messages that say what to do; nothing silent."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTJConfig, GPTJForCausalLM

import memfusion.kv as kv
from memfusion.errors import InvalidInput, MemfusionError, UnsupportedModel
from tests.kv.conftest import VOCAB, prompts


def test_unknown_policy_lists_the_valid_ones(llama: torch.nn.Module) -> None:
    ids, _ = prompts(1, 8)
    with pytest.raises(InvalidInput) as err:
        kv.generate(llama, ids, "qwest")
    for name in kv.POLICIES:
        assert name in str(err.value)


def test_unknown_parameter_names_the_allowed_ones() -> None:
    with pytest.raises(InvalidInput, match="allowed parameters: window, sinks"):
        kv.resolve("window", windw=3)


@pytest.mark.parametrize(("window", "sinks"), [(0, 0), (-1, 0), (4, -2)])
def test_window_needs_something_to_keep(window: int, sinks: int) -> None:
    with pytest.raises(InvalidInput, match=r"window|sinks"):
        kv.resolve("window", window=window, sinks=sinks)


def test_unsupported_model_class_is_named() -> None:
    cfg = GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, rotary_dim=8)
    model = GPTJForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedModel, match="GPTJForCausalLM") as err:
        kv.generate(model, torch.zeros(1, 4, dtype=torch.long))
    assert isinstance(err.value, InvalidInput)
    assert "LlamaForCausalLM" in str(err.value)


@pytest.mark.parametrize(
    ("ids", "mask", "match"),
    [
        (torch.tensor([[0.5, 1.0]]), None, "integer token ids"),
        (torch.tensor([[float("nan"), 1.0]]), None, "NaN"),
        (torch.tensor([[1, VOCAB]]), None, "vocab_size"),
        (torch.tensor([[1, -1]]), None, "vocab_size"),
        (torch.zeros(1, 0, dtype=torch.long), None, "length >= 1"),
        (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), "shape of input_ids"),
        (torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "left"),
        (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 0, 0]]), "at least one real token"),
        (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0.0, float("nan"), 1.0]]), "NaN"),
        (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 2, 1]]), "only 0"),
    ],
)
def test_malformed_inputs(llama: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        kv.generate(llama, ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize(
    ("kw", "match"), [({"max_new_tokens": 0}, "max_new_tokens"), ({"prefill_chunk": 0}, "prefill_chunk")]
)
def test_bad_generation_parameters(llama: torch.nn.Module, kw: dict[str, int], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        kv.generate(llama, torch.ones(1, 3, dtype=torch.long), **kw)  # type: ignore[arg-type]


def test_nan_in_model_states_is_refused() -> None:
    from tests.kv.conftest import FAMILIES

    model = FAMILIES["llama"]().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[5].fill_(float("nan"))  # type: ignore[union-attr,index]
    with pytest.raises(InvalidInput, match="non-finite"):
        kv.generate(model, torch.tensor([[1, 5, 2]]), max_new_tokens=2)


def test_cache_outside_attach_is_refused(llama: torch.nn.Module) -> None:
    cache = kv.make_cache(llama, "dense")
    with pytest.raises(MemfusionError, match="attach"):
        llama(torch.ones(1, 3, dtype=torch.long), **{kv.cache_kwarg(llama): cache}, use_cache=True)


def test_attach_restores_the_model_after_an_error(llama: torch.nn.Module) -> None:
    before = llama.config._attn_implementation
    cache = kv.make_cache(llama, "dense")
    with pytest.raises(RuntimeError, match="boom"), kv.attach(llama, cache):
        raise RuntimeError("boom")
    assert llama.config._attn_implementation == before
    out = llama(torch.ones(1, 3, dtype=torch.long))  # plain transformers still works
    assert torch.isfinite(out.logits).all()


def test_beam_search_is_refused(llama: torch.nn.Module) -> None:
    cache = kv.make_cache(llama, "dense")
    with pytest.raises(InvalidInput, match="num_beams=1"), kv.attach(llama, cache):
        llama.generate(
            torch.ones(1, 3, dtype=torch.long),
            **{kv.cache_kwarg(llama): cache},
            num_beams=2,  # type: ignore[operator]
            max_new_tokens=3,
            do_sample=False,
        )
