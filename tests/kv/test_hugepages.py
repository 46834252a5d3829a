"""Huge-page CPU buffers (quest's K/V pages): the same values as ``torch.full``, 2 MiB-aligned where
possible, switched off by ``MEMFUSION_HUGEPAGES=0``, and a quest layer computes the same on them."""

from __future__ import annotations

import pytest
import torch

from memfusion.kv import hugepages
from memfusion.kv.quest import Quest, QuestLayer
from memfusion.kv.spec import ModelSpec

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.bool])
@pytest.mark.parametrize("shape", [(3, 5), (1, 2, 300, 16, 64), (2, 1, 1000, 16, 33)])
def test_full_equals_torch_full(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    fill = True if dtype == torch.bool else 1.5
    got = hugepages.full(shape, fill, dtype=dtype, device=CPU)
    want = torch.full(shape, fill, dtype=dtype)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)
    got.view(-1)[-1] = False if dtype == torch.bool else 7.0  # writable, to the last element
    assert bool(got.view(-1)[-1] != want.view(-1)[-1])


def test_large_buffers_are_aligned_and_small_ones_are_ordinary(monkeypatch: pytest.MonkeyPatch) -> None:
    big = (1, 2, 600, 16, 64)  # 4.7 MiB of float32
    if hugepages.enabled():  # Linux: mapped on a 2 MiB boundary, so huge pages can back all of it
        assert hugepages.full(big, 0.0, torch.float32, CPU).data_ptr() % hugepages.HUGE == 0
    small = hugepages.full((4, 4), 0.0, torch.float32, CPU)
    assert small.untyped_storage().nbytes() == 64  # torch's own allocation: exactly its size
    monkeypatch.setenv("MEMFUSION_HUGEPAGES", "0")
    assert not hugepages.enabled()
    assert hugepages.full(big, 0.0, torch.float32, CPU).untyped_storage().nbytes() == 600 * 16 * 64 * 2 * 4


def _quest_run(monkeypatch: pytest.MonkeyPatch, huge: str) -> tuple[list[torch.Tensor], QuestLayer]:
    monkeypatch.setenv("MEMFUSION_HUGEPAGES", huge)
    spec = ModelSpec("LlamaForCausalLM", 1, 8, 2, 64, torch.float32, CPU)
    layer = QuestLayer(0, spec, Quest(token_budget=256, page_size=16, dense_layers=0))
    g = torch.Generator().manual_seed(0)
    outs = []
    for m in (4100, 1, 1, 1):  # a prefill past 2 MiB of K, then decode steps that select pages
        q, k, v = (torch.randn(1, h, m, 64, generator=g) for h in (8, 2, 2))
        outs.append(layer.attend(q, k, v, torch.ones(1, m, dtype=torch.bool), 0.125))
        layer.seen += m
    return outs, layer


def test_a_quest_layer_on_huge_pages_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    huge, layer = _quest_run(monkeypatch, "1")
    assert layer.last_selection is not None  # the decode steps selected pages
    aligned = layer.k.data_ptr() % hugepages.HUGE == 0 and layer.v.data_ptr() % hugepages.HUGE == 0
    assert aligned == hugepages.enabled()  # on huge-page memory wherever the platform has it
    plain, _ = _quest_run(monkeypatch, "0")
    for a, b in zip(huge, plain, strict=True):
        assert torch.equal(a, b)
