"""One matrix over every policy x model family x batch size.

The reference is the model itself with transformers' DynamicCache (``model.generate``).
"""

from __future__ import annotations

import pytest
import torch

import memfusion.kv as kv
from tests.kv.conftest import FAMILIES, build, prompts
from tests.kv.policies import LOSSLESS, TIGHT

PROMPT, NEW = 40, 6


def test_every_policy_is_in_the_table() -> None:
    assert set(kv.POLICIES) == set(LOSSLESS) == set(TIGHT)


def _reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):  # type: ignore[no-untyped-def]
    return model.generate(  # type: ignore[operator]
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", sorted(LOSSLESS))
def test_lossless_equals_dynamic_cache(policy: str, family: str, batch: int) -> None:
    """Dense, and each policy with lossless parameters, equals HF generate: tokens and logits."""
    model = build(family)
    ids, mask = prompts(batch, PROMPT, seed=batch, pad=9)
    ref = _reference(model, ids, mask)
    res = kv.generate(model, ids, policy, attention_mask=mask, max_new_tokens=NEW, prefill_chunk=16,
                      output_logits=True, **LOSSLESS[policy](PROMPT + NEW))
    assert torch.equal(res.sequences, ref.sequences)
    torch.testing.assert_close(res.logits, torch.stack(ref.logits, dim=1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", sorted(TIGHT))
def test_tight_bytes_match_analytic_count(policy: str, llama: torch.nn.Module) -> None:
    ids, _ = prompts(1, 3 * PROMPT, seed=3)
    res = kv.generate(llama, ids, policy, max_new_tokens=NEW, prefill_chunk=16, **TIGHT[policy])
    cfg = kv.resolve(policy, **TIGHT[policy])
    seen = 3 * PROMPT + NEW - 1  # the last generated token is never fed back
    assert res.stats.tokens_seen == seen
    assert res.stats.bytes_resident == cfg.analytic_bytes(seen, res.cache.spec)
    if cfg.bounded:
        assert res.stats.bytes_resident < kv.resolve("dense").analytic_bytes(seen, res.cache.spec)


@pytest.mark.parametrize("policy", sorted(TIGHT))
def test_low_level_path_matches_generate(policy: str, llama: torch.nn.Module) -> None:
    """The user's own model.generate(past_key_values=cache) inside attach() gives kv.generate's tokens."""
    ids, mask = prompts(2, PROMPT, seed=5, pad=4)
    res = kv.generate(llama, ids, policy, attention_mask=mask, max_new_tokens=NEW, prefill_chunk=None,
                      **TIGHT[policy])
    cache = kv.make_cache(llama, policy, **TIGHT[policy])
    with kv.attach(llama, cache):
        out = llama.generate(ids, attention_mask=mask, **{kv.cache_kwarg(llama): cache}, max_new_tokens=NEW,  # type: ignore[operator]
                             do_sample=False, pad_token_id=0)
    assert torch.equal(out, res.sequences)
    assert llama.config._attn_implementation != "memfusion"
