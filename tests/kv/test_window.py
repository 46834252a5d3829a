"""window: exact kept positions and the exact peak, against hand counts."""

from __future__ import annotations

import torch

import memfusion.kv as kv
from memfusion.kv.window import Window
from tests.kv.conftest import prompts


def _kept_positions(cache: kv.MemfusionCache, layer: int) -> list[list[set[int]]]:
    store = cache.kv_layers[layer].store  # type: ignore[attr-defined]
    pos, valid = store["pos"], store["valid"]
    return [[set(pos[b, h][valid[b, h]].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def test_keeps_sinks_and_the_last_window_of_real_tokens(llama: torch.nn.Module) -> None:
    ids, mask = prompts(2, 50, seed=7, pad=11)
    res = kv.generate(llama, ids, "window", attention_mask=mask, window=8, sinks=3, max_new_tokens=5, prefill_chunk=7)
    real = [50 + 4, 50 - 11 + 4]  # real tokens fed per row (prompt + 4 fed-back tokens)
    for layer in range(3):
        kept = _kept_positions(res.cache, layer)
        for b in range(2):
            expected = set(range(3)) | set(range(real[b] - 8, real[b]))
            assert all(k == expected for k in kept[b])


def test_peak_counts_one_chunk_in_flight(llama: torch.nn.Module) -> None:
    ids, _ = prompts(1, 120, seed=2)
    res = kv.generate(llama, ids, "window", window=16, sinks=4, max_new_tokens=3, prefill_chunk=16)
    spec = res.cache.spec
    per_token = spec.token_bytes
    # Every layer holds 20 tokens between steps; the layer attending holds 16 more.
    assert res.stats.peak_bytes == (spec.num_layers * 20 + 16) * per_token
    assert res.stats.bytes_resident == Window(16, 4).analytic_bytes(122, spec)


def test_plain_sliding_window_is_dense_until_it_drops_something(llama: torch.nn.Module) -> None:
    """sinks=0: a window covering everything equals dense; a tight one changes the first decode step
    (the prompt is one chunk, so the first logits still come from full attention)."""
    ids, _ = prompts(1, 30, seed=4)
    res = kv.generate(llama, ids, "window", window=30, sinks=0, max_new_tokens=2, output_logits=True)
    dense = kv.generate(llama, ids, "dense", max_new_tokens=2, output_logits=True)
    torch.testing.assert_close(res.logits, dense.logits, atol=1e-5, rtol=0)
    small = kv.generate(llama, ids, "window", window=10, sinks=0, max_new_tokens=2, output_logits=True)
    torch.testing.assert_close(small.logits[:, 0], dense.logits[:, 0], atol=1e-5, rtol=0)
    assert not torch.allclose(small.logits[:, 1], dense.logits[:, 1], atol=1e-4)
