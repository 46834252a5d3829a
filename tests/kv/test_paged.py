"""``paged`` on a tiny model: prefix sharing, copy-on-write after a fork, config validation."""

from __future__ import annotations

import pytest
import torch

import memfusion.kv as kv
from memfusion.errors import InvalidInput
from memfusion.kv.paged import PagedLayer, PagedState
from tests.kv.conftest import VOCAB

NEW = 4


def _state(cache: kv.MemfusionCache) -> PagedState:
    layer = cache.kv_layers[0]
    assert isinstance(layer, PagedLayer)
    return layer.state


def _page_bytes(spec: kv.ModelSpec, page_size: int) -> int:
    """K and V of one page, all layers."""
    return spec.num_layers * 2 * spec.num_kv_heads * page_size * spec.head_dim * spec.elem_bytes


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16", None])
def test_bad_page_size_is_invalid_input(bad: object, llama: torch.nn.Module) -> None:
    with pytest.raises(InvalidInput, match="page_size"):
        kv.resolve("paged", page_size=bad)
    with pytest.raises(InvalidInput, match="page_size"):
        kv.make_cache(llama, "paged", page_size=bad)


def test_shared_prefix_is_stored_once(llama: torch.nn.Module) -> None:
    """Two prompts with a 1,000-token common prefix, in one left-padded batch."""
    ps, prefix_len = 16, 1000
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, VOCAB, (prefix_len,), generator=g)
    suffix0 = torch.randint(0, VOCAB, (24,), generator=g)
    suffix1 = torch.randint(0, VOCAB, (10,), generator=g)
    suffix1[0] = (suffix0[0] + 1) % VOCAB  # the prompts differ from token 1000 on
    p0, p1 = torch.cat([prefix, suffix0]), torch.cat([prefix, suffix1])
    pad = len(p0) - len(p1)
    ids = torch.stack([p0, torch.cat([torch.zeros(pad, dtype=torch.long), p1])])  # (2, 1024)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0

    res = kv.generate(llama, ids, "paged", attention_mask=mask, max_new_tokens=NEW, output_logits=True,
                      page_size=ps)
    for row, prompt in ((0, p0), (1, p1)):  # the reference: each prompt alone, HF DynamicCache
        one = prompt.unsqueeze(0)  # (1, T); the mask is explicit: token 0 is not padding here
        ref = llama.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=NEW,  # type: ignore[operator]
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert torch.equal(res.sequences[row, pad if row else 0 :], ref.sequences[0])
        assert res.logits is not None
        torch.testing.assert_close(res.logits[row], torch.stack(ref.logits, dim=1)[0], atol=1e-4, rtol=0)

    seen0, seen1 = len(p0) + NEW - 1, len(p1) + NEW - 1  # the last generated token is never fed
    shared = prefix_len // ps  # full pages inside the common prefix
    pages = -(-seen0 // ps) + -(-seen1 // ps) - shared
    assert res.stats.bytes_resident == pages * _page_bytes(res.cache.spec, ps)
    # Row 1 lags row 0 (it is shorter), so each shared page is stored by row 0 and found by row 1.
    assert res.stats.prefix_hits == shared
    assert res.stats.prefix_lookups == seen0 // ps + seen1 // ps
    state = _state(res.cache)
    state.pool.check()
    t0, t1 = (state.pool.block_table(s) for s in state.seqs)
    assert t0[:shared] == t1[:shared] and not set(t0[shared:]) & set(t1[shared:])


def test_fork_copies_the_shared_partial_page_on_write(llama: torch.nn.Module) -> None:
    ps = 8
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 20), generator=g)  # pages: 8 + 8 + 4
    steps = torch.tensor([[[5], [9]], [[11], [2]]])  # (step, row, 1): different tokens per row
    cache = kv.make_cache(llama, "paged", page_size=ps)
    state = _state(cache)
    got: list[torch.Tensor] = []
    with torch.inference_mode(), kv.attach(llama, cache):
        llama(input_ids=prompt, **{kv.cache_kwarg(llama): cache}, use_cache=True)
        partial = state.pool.block_table(state.seqs[0])[2]
        cache.batch_repeat_interleave(2)
        for i, tok in enumerate(steps):
            got.append(llama(input_ids=tok, **{kv.cache_kwarg(llama): cache}, use_cache=True).logits[:, -1])  # (2, V)
            state.pool.check()
            t0, t1 = (state.pool.block_table(s) for s in state.seqs)
            assert t0[:2] == t1[:2]  # the full pages stay shared
            if i == 0:  # row 0 wrote first: it got a copy; row 1 then owned the original alone
                assert t0[2] != partial and t1[2] == partial
            assert state.pool.pages_used == 4
            assert cache.stats().bytes_resident == 4 * _page_bytes(cache.spec, ps)
    history = prompt.expand(2, -1)  # (2, 20)
    for i, tok in enumerate(steps):
        history = torch.cat([history, tok], dim=1)  # (2, 21 + i)
        with torch.inference_mode():
            ref = llama(input_ids=history).logits[:, -1]  # no cache, HF's own attention
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=0)
