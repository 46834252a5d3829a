"""The dense decode kernel against brute-force softmax attention over the keys the test fed in."""

from __future__ import annotations

import pytest
import torch

import memfusion.kv as kv
from memfusion.kv import decodeattn, kernels
from tests.kv.conftest import prompts

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is a dependency; the kernel needs it")


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Literal float64 attention: ``q (B, Hq, D)``, ``k``/``v`` ``(B, Hkv, n, D)``, ``allowed (B, Hkv, n)``."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            logits = (k[bi, kh].double() @ q[bi, h].double()) * scaling  # (n,)
            logits = logits.masked_fill(~allowed[bi, kh], float("-inf"))
            out[bi, h] = torch.softmax(logits, dim=0) @ v[bi, kh].double()
    return out


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "d", "cap", "start", "n", "chunk"),
    [
        (1, 8, 2, 64, 4096, 0, 4096, 512),  # whole buffer, chunks divide it
        (2, 4, 2, 16, 3000, 0, 2999, 512),  # a ragged last chunk, a spare slot
        (1, 4, 1, 8, 64, 10, 37, 16),  # an offset run inside the buffer (paged)
        (1, 2, 2, 8, 8, 0, 1, 512),  # one key
        (3, 6, 3, 5, 300, 0, 300, 7),  # odd head dim, many small chunks
        (1, 9, 3, 12, 100, 0, 98, 32),  # 3 query heads per KV head (the kernel's blocks take 2), 4-key blocks + 2
    ],
)
def test_matches_brute_force(b: int, hq: int, hkv: int, d: int, cap: int, start: int, n: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(b * 1000 + n)
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, cap, d, generator=g) * 3
    v = torch.randn(b, hkv, cap, d, generator=g)
    out = decodeattn.decode_attention(q, k, v, start, n, 0.3, chunk=chunk)
    assert out.shape == (b, 1, hq, d)
    sl = slice(start, start + n)
    ref = _reference(q[:, :, 0], k[:, :, sl], v[:, :, sl], torch.ones(b, hkv, n, dtype=torch.bool), 0.3)
    torch.testing.assert_close(out[:, 0].double(), ref, atol=2e-5, rtol=1e-4)


def test_masked_keys_are_left_out_and_the_own_key_always_attended() -> None:
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, d, n = 2, 4, 2, 16, 700
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    mask = torch.rand(b, hkv, n, generator=g) > 0.5
    mask[0, :, :600] = False  # whole chunks of row 0 masked (their partials must not count)
    mask[1, :, -1] = False  # row 1's own key masked as padding: still attended (never an empty row)
    out = decodeattn.decode_attention(q, k, v, 0, n, 0.125, mask, chunk=128)
    allowed = mask.clone()
    allowed[:, :, -1] = True
    ref = _reference(q[:, :, 0], k, v, allowed, 0.125)
    torch.testing.assert_close(out[:, 0].double(), ref, atol=2e-5, rtol=1e-4)
    # Only the own key left: the output is its value.
    only_own = torch.zeros_like(mask)
    solo = decodeattn.decode_attention(q, k, v, 0, n, 0.125, only_own, chunk=128)
    torch.testing.assert_close(solo[:, 0], v[:, :, -1].repeat_interleave(hq // hkv, dim=1))


def test_bad_ranges_and_strided_buffers_are_refused() -> None:
    q = torch.randn(1, 2, 1, 4)
    k = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="inside a buffer"):
        decodeattn.decode_attention(q, k, k, 5, 6, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        decodeattn.decode_attention(q, k[:, :, :8], k[:, :, :8], 0, 8, 1.0)


@pytest.mark.parametrize("policy", ["dense", "paged", "window"])
def test_policies_decode_the_same_with_the_kernel_and_with_torch_ops(
    policy: str, llama: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A left-padded batch through the kernel (float32 CPU) and through the torch ops it replaces."""
    ids, mask = prompts(2, 40, seed=3, pad=17)
    params = {"window": {"window": 16, "sinks": 2}}.get(policy, {})
    fast = kv.generate(llama, ids, policy, attention_mask=mask, max_new_tokens=6, output_logits=True, **params)
    monkeypatch.setattr(decodeattn, "serves", lambda q, k: False)
    slow = kv.generate(llama, ids, policy, attention_mask=mask, max_new_tokens=6, output_logits=True, **params)
    assert torch.equal(fast.sequences, slow.sequences)
    assert fast.logits is not None and slow.logits is not None
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("size", "pages", "last"),
    [(16, 70, 9), (16, 3, 16), (4, 300, 1), (6, 40, 5), (13, 20, 13), (512, 2, 100), (1000, 2, 7)],
)
def test_scattered_runs_match_brute_force(size: int, pages: int, last: int) -> None:
    """Runs (quest's pages) scattered over the buffer in any order, several tasks per head, a mask; short
    runs of any size (read 4 rows at a time, prefetching into the next run) and long ones."""
    g = torch.Generator().manual_seed(size * pages)
    b, hq, hkv, d, cap = 2, 4, 2, 16, pages + 5  # cap pages per head in a page-major buffer
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, cap, size, d, generator=g)
    v = torch.randn(b, hkv, cap, size, d, generator=g)
    sel = torch.stack([torch.randperm(cap, generator=g)[:pages] for _ in range(b * hkv)]).view(b, hkv, pages)
    mask = torch.rand(b, hkv, pages * size, generator=g) > 0.3
    mask[:, :, (pages - 1) * size] = True  # a key every row keeps
    first = (torch.arange(b * hkv).view(b, hkv, 1) * cap + sel) * size
    out = decodeattn.run_attention(q, k.view(-1, d), v.view(-1, d), first, size, last, 0.5, mask)
    # the reference: the selected pages gathered in order, the final one cut to `last` keys
    idx = sel.view(b, hkv, pages, 1, 1).expand(b, hkv, pages, size, d)
    keys = k.gather(2, idx).view(b, hkv, pages * size, d)[:, :, : (pages - 1) * size + last]
    vals = v.gather(2, idx).view(b, hkv, pages * size, d)[:, :, : (pages - 1) * size + last]
    allowed = mask[:, :, : (pages - 1) * size + last]
    ref = _reference(q[:, :, 0], keys, vals, allowed, 0.5)
    torch.testing.assert_close(out[:, 0].double(), ref, atol=2e-5, rtol=1e-4)
