"""``tiered``: page selection against brute force, exactness when everything is retrieved, cold files."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

import memfusion.kv as kv
from memfusion.errors import InvalidInput
from memfusion.kv.spec import ModelSpec
from memfusion.kv.tiered import Tiered, TieredLayer
from tests.kv.conftest import prompts

HQ, HKV, D = 4, 2, 8
G = HQ // HKV
SCALE = D**-0.5


def _spec(dtype: torch.dtype = torch.float32) -> ModelSpec:
    return ModelSpec("LlamaForCausalLM", 1, HQ, HKV, D, dtype, torch.device("cpu"))


CHUNKS = (5, 3, 1, 1, 4, 2, 1, 6, 1, 1)


def _steps(
    batch: int = 2, pad: int = 3, seed: int = 0, chunks: tuple[int, ...] = CHUNKS
) -> list[tuple[torch.Tensor, ...]]:
    """Random (q, k, v, valid) chunks; row 1 starts with ``pad`` padding slots."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, m in enumerate(chunks):
        q = torch.randn(batch, HQ, m, D, generator=g)
        k = torch.randn(batch, HKV, m, D, generator=g)
        v = torch.randn(batch, HKV, m, D, generator=g)
        valid = torch.ones(batch, m, dtype=torch.bool)
        if i == 0:
            valid[1, :pad] = False
        out.append((q, k, v, valid))
    return out


def _reference_step(
    hist_k: torch.Tensor, hist_v: torch.Tensor, hist_valid: torch.Tensor, q: torch.Tensor, m: int, cfg: Tiered
) -> tuple[list[list[list[int]]], torch.Tensor, list[int]]:
    """Brute force for the step whose chunk is the last ``m`` slots of the history.

    Returns the expected selected pages per (row, KV head), the expected output ``(B, m, Hq, D)``
    (rows of padding queries left at 0) and the cold page count per row before the step.
    """
    b, _, s, _ = hist_k.shape
    p = cfg.page_size
    pos = torch.where(hist_valid, hist_valid.long().cumsum(1) - 1, -1)  # (B, S)
    old = s - m  # slots before this step
    out = torch.zeros(b, m, HQ, D)
    selected: list[list[list[int]]] = []
    counts = []
    for r in range(b):
        evicted = int(hist_valid[r, : max(0, old - cfg.window)].sum())
        c = evicted // p
        counts.append(c)
        row_sel = []
        for h in range(HKV):
            reps = [hist_k[r, h][(pos[r] >= j * p) & (pos[r] < (j + 1) * p)].mean(0) for j in range(c)]
            qs = q[r, h * G : (h + 1) * G][:, hist_valid[r, old:]]  # (G, real queries, D)
            scores = [float((qs @ rep).max()) * SCALE for rep in reps]
            top = sorted(range(c), key=lambda j: -scores[j])[: cfg.retrieve_pages]
            row_sel.append(sorted(top))
            in_sel = torch.zeros(s, dtype=torch.bool)
            for j in top:
                in_sel |= (pos[r] >= j * p) & (pos[r] < (j + 1) * p)
            for t in range(m):
                if not hist_valid[r, old + t]:
                    continue
                pt = int(pos[r, old + t])
                keys = hist_valid[r] & (in_sel | ((pos[r] >= c * p) & (pos[r] <= pt)))  # (S,)
                for gi in range(G):
                    hq = h * G + gi
                    w = torch.softmax(hist_k[r, h][keys] @ q[r, hq, t] * SCALE, dim=0)
                    out[r, t, hq] = w @ hist_v[r, h][keys]
        selected.append(row_sel)
    return selected, out, counts


@pytest.mark.parametrize(
    ("cfg", "pad", "chunks"),
    [
        (Tiered(window=4, page_size=2, retrieve_pages=2), 3, CHUNKS),
        # more padding than the window, chunks longer than it: evictions mix padding and real slots
        (Tiered(window=8, page_size=4, retrieve_pages=1), 9, (16, 16, 8, 1, 1, 1, 1, 1)),
    ],
)
def test_selection_and_output_match_brute_force(cfg: Tiered, pad: int, chunks: tuple[int, ...]) -> None:
    layer = cfg.make_layer(0, _spec())
    assert isinstance(layer, TieredLayer)
    ks, vs, valids = [], [], []
    checked_sparse = False
    for q, k, v, valid in _steps(pad=pad, chunks=chunks):
        ks.append(k)
        vs.append(v)
        valids.append(valid)
        hk, hv, hvalid = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(valids, 1)
        exp_sel, exp_out, counts = _reference_step(hk, hv, hvalid, q, k.shape[2], cfg)
        out = layer.attend(q, k, v, valid, SCALE)
        assert layer.last_selected is not None
        got = [[sorted(j for j in layer.last_selected[r, h].tolist() if j >= 0) for h in range(HKV)] for r in range(2)]
        assert got == exp_sel
        checked_sparse |= any(c > cfg.retrieve_pages for c in counts)
        real = valid.view(2, -1, 1, 1).expand_as(out)
        torch.testing.assert_close(out[real], exp_out[real], atol=1e-5, rtol=0)
    assert checked_sparse  # some step had more cold pages than it retrieved
    # Padding never reaches staging or the cold tier: the window's slots are all real at the end.
    real = [sum(chunks), sum(chunks) - pad]
    p, w = cfg.page_size, cfg.window
    assert layer.cold_count.tolist() == [(r - w) // p for r in real]
    assert layer.staged.tolist() == [(r - w) % p for r in real]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cold_dir_layer_equals_memory(dtype: torch.dtype, tmp_path: Path) -> None:
    spec = _spec(dtype)
    mem = Tiered(window=4, page_size=2, retrieve_pages=1).make_layer(0, spec)
    disk = Tiered(window=4, page_size=2, retrieve_pages=1, cold_dir=str(tmp_path)).make_layer(0, spec)
    for q, k, v, valid in _steps(seed=1):
        a = mem.attend(q.to(dtype), k.to(dtype), v.to(dtype), valid, SCALE)
        b = disk.attend(q.to(dtype), k.to(dtype), v.to(dtype), valid, SCALE)
        assert torch.equal(a, b)
    files = list(tmp_path.glob("memfusion-tiered-*"))
    assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)
    assert mem.stats() == disk.stats()
    disk.clear()
    assert list(tmp_path.iterdir()) == []


def test_everything_retrieved_equals_dense() -> None:
    """A tight window with retrieve_pages >= cold pages attends to every token: dense, exactly."""
    from tests.kv.conftest import build

    model = build("llama")
    ids, mask = prompts(2, 40, seed=7, pad=9)
    common: dict[str, Any] = dict(attention_mask=mask, max_new_tokens=6, prefill_chunk=16, output_logits=True)
    ref = kv.generate(model, ids, "dense", **common)
    res = kv.generate(model, ids, "tiered", window=8, page_size=4, retrieve_pages=64, **common)
    assert res.stats.bytes_offloaded > 0 and res.stats.pages_total > 0
    assert res.stats.pages_selected == res.stats.pages_total
    assert torch.equal(res.sequences, ref.sequences)
    torch.testing.assert_close(res.logits, ref.logits, atol=1e-5, rtol=0)


def test_cold_dir_generate_equals_memory_and_cleans_up(tmp_path: Path) -> None:
    from tests.kv.conftest import build

    model = build("llama")
    ids, mask = prompts(2, 40, seed=2, pad=5)
    params: dict[str, Any] = dict(window=8, page_size=4, retrieve_pages=2, attention_mask=mask, max_new_tokens=4,
                                  prefill_chunk=16, output_logits=True)
    mem = kv.generate(model, ids, "tiered", **params)
    disk = kv.generate(model, ids, "tiered", cold_dir=str(tmp_path), **params)
    assert torch.equal(mem.logits, disk.logits)
    assert mem.stats.bytes_offloaded == disk.stats.bytes_offloaded > 0
    assert len(list(tmp_path.glob("memfusion-tiered-*.bin"))) == 2 * 3  # K and V per layer
    disk.cache.reset()
    assert list(tmp_path.iterdir()) == []
    again = kv.generate(model, ids, "tiered", cold_dir=str(tmp_path), **params)
    assert list(tmp_path.iterdir())
    del again
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_bytes_and_pages_hand_count() -> None:
    """llama tiny: 3 layers, 2 KV heads, D = 16, fp32 -> one token's K+V = 2*2*16*4 = 256 bytes."""
    from tests.kv.conftest import build

    ids, _ = prompts(1, 120, seed=3)
    res = kv.generate(build("llama"), ids, "tiered", window=16, page_size=4, retrieve_pages=2,
                      max_new_tokens=6, prefill_chunk=16)
    # 125 tokens seen: 16 hot, 109 evicted = 27 pages + 1 staged.
    assert res.stats.tokens_resident == 16 + 1
    assert res.stats.bytes_offloaded == 3 * 27 * 4 * 256
    cfg = kv.resolve("tiered", window=16, page_size=4, retrieve_pages=2)
    assert isinstance(cfg, Tiered) and cfg.analytic_offloaded_bytes(125, res.cache.spec) == res.stats.bytes_offloaded
    assert res.stats.bytes_resident == 3 * ((16 + 1) * 256 + 27 * 2 * 16 * 4)  # + one 16-float rep key per page/head
    # Cold pages before each step: prefill chunks end at 0,16,...,112 tokens -> (t - 16) // 4 =
    # 0,0,4,8,12,16,20,24; decode steps start at 120..124 tokens -> 26,26,26,26,27.
    assert res.stats.pages_total == 3 * 2 * (84 + 131)
    assert res.stats.pages_selected == 3 * 2 * (6 * 2 + 5 * 2)


@pytest.mark.parametrize(
    "params",
    [
        {"window": 0},
        {"window": 2.5},
        {"page_size": 0},
        {"page_size": True},
        {"retrieve_pages": -1},
        {"cold_dir": "/nonexistent/memfusion"},
        {"cold_dir": 3},
        {"pages": 3},
    ],
)
def test_bad_config(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        kv.resolve("tiered", **params)


def test_cold_dir_must_be_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidInput, match="cold_dir"):
        Tiered(cold_dir=str(f))
