"""The ``quant`` policy: arithmetic, packing, layout, attention, bytes and errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memfusion.kv as kv
from memfusion.errors import InvalidInput
from memfusion.kv.quant import Quant, QuantLayer, dequantise, pack, packed_width, quantise, unpack
from memfusion.kv.spec import ModelSpec
from tests.kv.conftest import prompts

BITS = st.sampled_from([2, 4, 8])


def _spec(heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 1) -> ModelSpec:
    return ModelSpec("LlamaForCausalLM", layers, heads, kv_heads, head_dim, torch.float32, torch.device("cpu"))


# --- arithmetic ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    bits=BITS,
    rows=st.integers(1, 6),
    cols=st.integers(1, 9),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.floats(1e-3, 1e3),
    constant=st.booleans(),
)
def test_round_trip_error_is_at_most_half_a_step(
    bits: int, rows: int, cols: int, dim: int, seed: int, magnitude: float, constant: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * magnitude
    if constant:
        x = torch.full_like(x, float(x[0, 0]))
    codes, scale, zero = quantise(x, dim, bits)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) <= 2**bits - 1
    x64 = x.double()
    expected_scale = (x64.amax(dim, keepdim=True) - x64.amin(dim, keepdim=True)) / (2**bits - 1)
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero.double(), x64.amin(dim, keepdim=True), rtol=0, atol=0)
    err = (dequantise(codes, scale, zero).double() - x64).abs()
    slack = 1e-5 * float(x64.abs().max())  # float32 rounding of (x - zero) / scale and back
    assert bool((err <= scale.double() / 2 + slack).all()), float((err - scale / 2).max())
    if constant:
        assert bool((err == 0).all())


def test_masked_elements_stay_out_of_the_range() -> None:
    x = torch.tensor([[0.0, 1.0, 100.0, 3.0]])
    mask = torch.tensor([[True, True, False, True]])
    _, scale, zero = quantise(x, 1, 2, mask)
    assert float(zero) == 0.0 and float(scale) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, lead=st.integers(1, 3), d=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_is_exact(bits: int, lead: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (lead, d), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (lead, math.ceil(d * bits / 8)) == (lead, packed_width(d, bits))
    assert torch.equal(unpack(packed, bits, d), codes)


def test_pack_bit_layout() -> None:
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(torch.tensor([[0xA, 0x5, 0x3]], dtype=torch.uint8), 4).tolist() == [[0x5A, 0x03]]
    assert pack(torch.tensor([[7, 255]], dtype=torch.uint8), 8).tolist() == [[7, 255]]


# --- the layer against an independent reference ---------------------------------------------
def _ref_dequant(
    k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor, n: int, gs: int, vg: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[:n]`` of ``k``/``v (B, H, T, D)`` through KIVI quantisation, by explicit loops.

    Keys: per channel over each group of ``gs`` tokens, padding (``ok (B, T)`` False) excluded
    from the range. Values: per token over each group of ``vg`` channels.
    """
    levels = 2**bits - 1

    def q(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        lo = float(x[counted].min()) if bool(counted.any()) else 0.0
        hi = float(x[counted].max()) if bool(counted.any()) else 0.0
        step = (hi - lo) / levels
        if step == 0:
            return torch.full_like(x, lo)
        return ((x - lo) / step).round().clamp(0, levels) * step + lo

    kd, vd = k.clone(), v.clone()
    b, h, _, d = k.shape
    for bi in range(b):
        for hi_ in range(h):
            for s in range(0, n, gs):
                for c in range(d):
                    kd[bi, hi_, s : s + gs, c] = q(k[bi, hi_, s : s + gs, c], ok[bi, s : s + gs])
            for t in range(n):
                for c in range(0, d, vg):
                    vd[bi, hi_, t, c : c + vg] = q(v[bi, hi_, t, c : c + vg], torch.ones(vg, dtype=torch.bool))
    return kd, vd


def _ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor, scaling: float) -> torch.Tensor:
    """Naive float64 attention of ``q (B, Hq, Tq, D)``, the last ``Tq`` keys being the queries'."""
    b, hq, tq, _ = q.shape
    n, g = k.shape[2], hq // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)  # (B, Hq, N, D)
    vv = v.double().repeat_interleave(g, dim=1)
    logits = torch.einsum("bhtd,bhnd->bhtn", q.double(), kk) * scaling  # (B, Hq, Tq, N)
    allowed = ok[:, None, None, :].expand(b, 1, tq, n).clone()  # (B, 1, Tq, N)
    for i in range(tq):
        allowed[:, :, i, n - tq + i + 1 :] = False  # later tokens of the chunk
        allowed[:, :, i, n - tq + i] = True  # always its own key
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhtn,bhnd->bthd", probs, vv)  # (B, Tq, Hq, D)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layer_attention_matches_reference(bits: int) -> None:
    """Chunks and decode steps with padding; several dequantisation blocks per step."""
    spec = _spec()
    cfg = Quant(bits=bits, group_size=4, residual=3)
    layer = cfg.make_layer(0, spec)
    assert isinstance(layer, QuantLayer)
    layer.dequant_groups = 1  # one group per dequantised block: exercises the log-sum-exp merge
    g = torch.Generator().manual_seed(bits)
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    oks: list[torch.Tensor] = []
    for step, tq in enumerate([5, 7, 1, 1, 6, 1, 1]):
        q = torch.randn(2, 4, tq, 8, generator=g)
        k, v = torch.randn(2, 2, tq, 8, generator=g), torch.randn(2, 2, tq, 8, generator=g)
        ok = torch.ones(2, tq, dtype=torch.bool)
        if step == 0:
            ok[1, :3] = False  # left padding of row 1
        before = sum(x.shape[2] for x in ks)
        ks, vs, oks = [*ks, k], [*vs, v], [*oks, ok]
        kall, vall, okall = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(oks, 1)
        nq = cfg.quantised_tokens(before)
        kd, vd = _ref_dequant(kall, vall, okall, nq, 4, 4, bits)
        want = _ref_attention(q, kd, vd, okall, 0.3)
        got = layer.attend(q, k, v, ok, 0.3)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
        layer.seen += tq
        assert layer.blocks is not None and layer.res_k is not None
        assert layer.blocks.n * cfg.group_size == cfg.quantised_tokens(before + tq)
        assert layer.res_k.shape[2] < cfg.residual + cfg.group_size


# --- generation -----------------------------------------------------------------------------
def _gen(model: torch.nn.Module, policy: str, **params: Any) -> kv.GenerateResult:
    ids, mask = prompts(2, 64, seed=7, pad=5)
    return kv.generate(model, ids, policy, attention_mask=mask, max_new_tokens=4, prefill_chunk=16,
                       output_logits=True, **params)


def test_eight_bits_is_close_to_dense(llama: torch.nn.Module) -> None:
    """8-bit codes round each element within 1/510 of its group's range, so attention outputs
    move by ~0.1%; the tiny model's logits (std ~0.16) then move by a few 1e-4 (measured: 4e-4).
    ``TOL = 2e-3`` (about 1% of the logit spread) leaves headroom and still catches a coarse
    cache: the same check at 2 bits must fail it (measured: 3.5e-2)."""
    tol = 2e-3
    ref = _gen(llama, "dense")
    q8 = _gen(llama, "quant", bits=8, group_size=16, residual=8)
    q2 = _gen(llama, "quant", bits=2, group_size=16, residual=8)
    assert q8.logits is not None and q2.logits is not None and ref.logits is not None
    assert q8.stats.bytes_resident < ref.stats.bytes_resident  # something was quantised
    assert torch.equal(q8.sequences, ref.sequences)
    assert float((q8.logits - ref.logits).abs().max()) <= tol
    assert float((q2.logits - ref.logits).abs().max()) > tol


def test_sixteen_bits_is_dense(llama: torch.nn.Module) -> None:
    ref = _gen(llama, "dense")
    res = _gen(llama, "quant", bits=16, group_size=1, residual=0)
    assert torch.equal(res.sequences, ref.sequences)
    assert res.logits is not None and ref.logits is not None and torch.equal(res.logits, ref.logits)
    assert res.stats.bytes_resident == ref.stats.bytes_resident


def test_bytes_match_a_hand_count(llama: torch.nn.Module) -> None:
    """TIGHT on the tiny llama (3 layers, 2 KV heads, head_dim 16, fp32) after 125 token slots.

    (125 - 16) // 16 = 6 groups = 96 quantised tokens, 29 residual. Per layer and KV head:
    key + value codes 2 * 96 * 16 * 4 / 8 = 1536; key scale+zero 6 groups * 16 channels * 2 * 4
    = 768; value scale+zero 96 tokens * 1 group * 2 * 4 = 768; residual 29 * 2 * 16 * 4 = 3712.
    Total 6784 * 3 layers * 2 heads = 40704 bytes.
    """
    ids, _ = prompts(1, 120, seed=3)
    res = kv.generate(llama, ids, "quant", max_new_tokens=6, prefill_chunk=16, bits=4, group_size=16, residual=16)
    assert res.stats.tokens_seen == 125
    assert res.stats.bytes_resident == 40704 == Quant(bits=4, group_size=16, residual=16).analytic_bytes(
        125, res.cache.spec
    )
    assert res.stats.tokens_resident == 125


def test_value_group_is_clamped_to_head_dim(llama: torch.nn.Module) -> None:
    """group_size 32 > head_dim 16: one value scale per token; keys grouped over 32 tokens."""
    ids, _ = prompts(1, 100, seed=4)
    cfg = Quant(bits=2, group_size=32, residual=8)
    res = kv.generate(llama, ids, cfg, max_new_tokens=1, prefill_chunk=16)
    # 100 slots: 2 groups = 64 tokens quantised, 36 residual; per head 2*64*4 + 2*16*2*4 + 64*1*2*4 + 36*128
    per_head = 2 * 64 * 4 + 2 * 16 * 2 * 4 + 64 * 2 * 4 + 36 * 2 * 16 * 4
    assert res.stats.bytes_resident == 3 * 2 * per_head == cfg.analytic_bytes(100, res.cache.spec)


def test_peak_follows_the_quantised_size(llama: torch.nn.Module) -> None:
    """After each step at most residual + group_size - 1 tokens are in full precision."""
    ids, _ = prompts(1, 160, seed=5)
    cfg = Quant(bits=4, group_size=16, residual=16)
    res = kv.generate(llama, ids, cfg, max_new_tokens=2, prefill_chunk=16)
    spec, seen = res.cache.spec, res.stats.tokens_seen
    slack = spec.num_layers * (cfg.group_size - 1) * spec.token_bytes
    assert res.stats.peak_bytes <= cfg.analytic_bytes(seen, spec) + slack
    assert res.stats.peak_bytes < kv.resolve("dense").analytic_bytes(seen, spec) / 2


def test_four_bits_at_32k_is_over_3_5x_smaller() -> None:
    """fp32, head_dim 64, group_size 32, residual 128, 32768 tokens, per layer and KV head:
    codes 2 * 32640 * 32 = 2088960; key scales 1020 * 64 * 8 = 522240; value scales
    32640 * 2 * 8 = 522240; residual 128 * 512 = 65536 -> 3198976 bytes vs 16777216 (5.24x)."""
    spec = _spec(heads=1, kv_heads=1, head_dim=64)
    quant = Quant(bits=4, group_size=32, residual=128).analytic_bytes(32768, spec)
    dense = kv.resolve("dense").analytic_bytes(32768, spec)
    assert quant == 3198976 and dense == 16777216
    assert dense / quant >= 3.5


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"bits": 3}, "bits must be one of 2, 4, 8, 16"),
        ({"bits": True}, "bits must be one of"),
        ({"bits": 4.0}, "bits must be one of"),
        ({"group_size": 0}, "group_size must be an integer >= 1"),
        ({"residual": -1}, "residual must be an integer >= 0"),
    ],
)
def test_bad_parameters(params: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        Quant(**params)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=match):
        kv.resolve("quant", **params)


def test_group_size_must_divide_head_dim() -> None:
    with pytest.raises(InvalidInput, match="group_size=12 must divide the model's head_dim=16"):
        Quant(group_size=12).make_layer(0, _spec(head_dim=16))
    Quant(group_size=8).make_layer(0, _spec(head_dim=16))  # a divisor is fine
