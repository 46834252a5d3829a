"""MemoryAugmentedAttention and FusionLM against independent references.

References are written out here: causal softmax attention with an explicit mask, RoPE as a
complex rotation, and per-query Python loops for the three retrievers (sorting, distances,
Hopfield updates).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.func import functional_call

from memfusion.errors import InvalidInput
from memfusion.neural.fusion import (
    RETRIEVERS,
    DndRetriever,
    FusionConfig,
    FusionMemory,
    HopfieldRetriever,
    KnnRetriever,
    LocalAttention,
    MemoryAugmentedAttention,
)
from memfusion.neural.fusion_lm import FusionLM, FusionLMConfig, run_segments

DT = torch.float64


def _layer(seed: int = 0, **kw: object) -> MemoryAugmentedAttention:
    torch.manual_seed(seed)
    cfg = FusionConfig(**{"d_model": 12, "n_heads": 3, "top_k": 4, "capacity": 64, **kw})  # type: ignore[arg-type]
    return MemoryAugmentedAttention(cfg).to(DT)


def _memory(b: int, h: int, n: int, d: int, seed: int = 1, scale: float = 1.0) -> FusionMemory:
    g = torch.Generator().manual_seed(seed)
    return FusionMemory(
        keys=torch.randn(b, h, n, d, generator=g, dtype=DT) * scale,
        values=torch.randn(b, h, n, d, generator=g, dtype=DT),
    )


def _rope_reference(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as multiplication of the complex numbers x[i] + i x[i + D/2] by exp(i t theta_i)."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    theta = torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=x.dtype)
    t = torch.arange(x.shape[-2], dtype=x.dtype)
    z = z * torch.polar(torch.ones(len(t), d // 2, dtype=x.dtype), t[:, None] * theta[None, :])
    return torch.cat([z.real, z.imag], dim=-1)


def _qkv(attn: LocalAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head projections from the weight matrix, (B, H, T, D) each."""
    c, h = attn.d_model, attn.n_heads
    w = attn.qkv.weight
    q, k, v = (x @ w[i * c : (i + 1) * c].T for i in range(3))
    b, t, _ = x.shape
    return tuple(m.view(b, t, h, c // h).transpose(1, 2) for m in (q, k, v))  # type: ignore[return-value]


def _local_reference(attn: LocalAttention, x: torch.Tensor) -> torch.Tensor:
    """Heads (B, H, T, D) of causal softmax attention with an explicit -inf mask above the diagonal."""
    q, k, v = _qkv(attn, x)
    if attn.rotary:
        q, k = _rope_reference(q, attn.rotary_base), _rope_reference(k, attn.rotary_base)
    t = x.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.tensor([[j > i for j in range(t)] for i in range(t)])
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _merge_reference(attn: LocalAttention, heads: torch.Tensor) -> torch.Tensor:
    b, h, t, d = heads.shape
    return heads.transpose(1, 2).reshape(b, t, h * d) @ attn.out.weight.T


# ------------------------------------------------------------------------------------------------
# The layer against closed-form references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotary", [False, True])
def test_empty_memory_is_plain_causal_attention(rotary: bool) -> None:
    layer = _layer(rotary=rotary, gate_init=2.0)
    x = torch.randn(2, 7, 12, dtype=DT)
    y, mem = layer(x, None)
    ref = _merge_reference(layer.attn, _local_reference(layer.attn, x))
    torch.testing.assert_close(y, ref)
    assert mem.size == 7


@pytest.mark.parametrize("retriever", sorted(RETRIEVERS))
def test_gate_closed_is_plain_causal_attention(retriever: str) -> None:
    layer = _layer(retriever=retriever)
    with torch.no_grad():
        layer.gate.fill_(float("-inf"))  # g_h = sigmoid(-inf) = 0
    x = torch.randn(2, 5, 12, dtype=DT)
    y, _ = layer(x, _memory(2, 3, 9, 4))
    torch.testing.assert_close(y, _merge_reference(layer.attn, _local_reference(layer.attn, x)))


def test_knn_with_k_equal_memory_size_is_dense_attention_over_the_memory() -> None:
    n = 9
    layer = _layer(top_k=n, gate_init=0.3)
    x = torch.randn(2, 5, 12, dtype=DT)
    mem = _memory(2, 3, n, 4)
    y, _ = layer(x, mem)
    q, _, _ = _qkv(layer.attn, x)
    dense = torch.softmax(q @ mem.keys.transpose(-1, -2) / 2.0, dim=-1) @ mem.values  # sqrt(D) = 2
    g = 1 / (1 + math.exp(-0.3))
    ref = _merge_reference(layer.attn, g * dense + (1 - g) * _local_reference(layer.attn, x))
    torch.testing.assert_close(y, ref)
    # top_k=None reads every pair too
    layer_all = _layer(top_k=None, gate_init=0.3)
    layer_all.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer_all(x, mem)[0], ref)


def _knn_loop(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            s = [float(q[b, t] @ keys[b, i]) * scale for i in range(keys.shape[1])]
            top = sorted(range(len(s)), key=lambda i: -s[i])[:k]
            z = sum(math.exp(s[i]) for i in top)
            for i in top:
                out[b, t] += math.exp(s[i]) / z * values[b, i]
    return out


def _dnd_loop(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, delta: float) -> torch.Tensor:
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            d2 = [sum(float(q[b, t, j] - keys[b, i, j]) ** 2 for j in range(q.shape[2])) for i in range(keys.shape[1])]
            near = sorted(range(len(d2)), key=lambda i: d2[i])[:k]
            kern = {i: 1.0 / (d2[i] + delta) for i in near}
            z = sum(kern.values())
            for i in near:
                out[b, t] += kern[i] / z * values[b, i]
    return out


def _hopfield_loop(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, beta: float, steps: int
) -> torch.Tensor:
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            s = [float(q[b, t] @ keys[b, i]) for i in range(keys.shape[1])]
            top = sorted(range(len(s)), key=lambda i: -s[i])[:k]
            xi = q[b, t].clone()
            for _ in range(steps + 1):
                e = [math.exp(beta * float(keys[b, i] @ xi)) for i in top]
                p = [v / sum(e) for v in e]
                read_keys = sum(pi * keys[b, i] for pi, i in zip(p, top, strict=True))
                read_values = sum(pi * values[b, i] for pi, i in zip(p, top, strict=True))
                xi = read_keys  # the update; the last pass's weights give the read-out
            out[b, t] = read_values
    return out


@pytest.mark.parametrize("k", [1, 3, 7])
def test_retrievers_match_brute_force_loops(k: int) -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, generator=g, dtype=DT)
    keys = torch.randn(2, 7, 5, generator=g, dtype=DT)
    values = torch.randn(2, 7, 5, generator=g, dtype=DT)
    torch.testing.assert_close(KnnRetriever(0.7)(q, keys, values, k), _knn_loop(q, keys, values, k, 0.7))
    torch.testing.assert_close(DndRetriever(0.01)(q, keys, values, k), _dnd_loop(q, keys, values, k, 0.01))
    for steps in (0, 1, 3):
        torch.testing.assert_close(
            HopfieldRetriever(0.8, steps)(q, keys, values, k), _hopfield_loop(q, keys, values, k, 0.8, steps)
        )


@pytest.mark.parametrize("retriever", sorted(RETRIEVERS))
def test_layer_memory_branch_uses_the_configured_retriever_per_head(retriever: str) -> None:
    layer = _layer(retriever=retriever, top_k=3, dnd_delta=0.05, hopfield_beta=0.9, hopfield_steps=2)
    with torch.no_grad():
        layer.gate.fill_(float("inf"))  # g_h = 1: the memory branch alone
    x = torch.randn(2, 4, 12, dtype=DT)
    mem = _memory(2, 3, 6, 4)
    with torch.no_grad():
        q, _, _ = _qkv(layer.attn, x)
    ref = torch.zeros_like(q)
    for h in range(3):
        qh, kh, vh = q[:, h], mem.keys[:, h], mem.values[:, h]
        if retriever == "knn":
            ref[:, h] = _knn_loop(qh, kh, vh, 3, 0.5)
        elif retriever == "dnd":
            ref[:, h] = _dnd_loop(qh, kh, vh, 3, 0.05)
        else:
            ref[:, h] = _hopfield_loop(qh, kh, vh, 3, 0.9, 2)
    torch.testing.assert_close(layer(x, mem)[0], _merge_reference(layer.attn, ref))


def test_fewer_pairs_than_top_k_reads_all_of_them() -> None:
    layer = _layer(top_k=8, gate_init=50.0)  # g = 1 - 2e-22: the memory branch
    x = torch.randn(1, 3, 12, dtype=DT)
    mem = _memory(1, 3, 2, 4)
    q, _, _ = _qkv(layer.attn, x)
    dense = torch.softmax(q @ mem.keys.transpose(-1, -2) / 2.0, dim=-1) @ mem.values
    torch.testing.assert_close(layer(x, mem)[0], _merge_reference(layer.attn, dense))


# ------------------------------------------------------------------------------------------------
# Memory state: FIFO, detachment, round-trip
# ------------------------------------------------------------------------------------------------


def test_memory_is_fifo_bounded_and_holds_the_projected_keys_and_values() -> None:
    layer = _layer(capacity=10, top_k=2)
    xs = [torch.randn(2, 4, 12, dtype=DT) for _ in range(4)]
    mem = None
    for x in xs:
        _, mem = layer(x, mem)
    assert mem is not None and mem.size == 10
    all_k = torch.cat([_qkv(layer.attn, x)[1] for x in xs], dim=2)  # (B, H, 16, D), oldest first
    all_v = torch.cat([_qkv(layer.attn, x)[2] for x in xs], dim=2)
    torch.testing.assert_close(mem.keys, all_k[:, :, -10:])
    torch.testing.assert_close(mem.values, all_v[:, :, -10:])
    assert not mem.keys.requires_grad and not mem.values.requires_grad


def test_no_gradient_flows_into_past_segments() -> None:
    layer = _layer()
    x1 = torch.randn(1, 4, 12, dtype=DT, requires_grad=True)
    x2 = torch.randn(1, 4, 12, dtype=DT, requires_grad=True)
    _, mem = layer(x1, None)
    y2, _ = layer(x2, mem)
    y2.sum().backward()
    assert x1.grad is None
    assert x2.grad is not None and bool(x2.grad.abs().sum() > 0)
    assert layer.gate.grad is not None and bool(layer.gate.grad.abs().sum() > 0)


def test_memory_state_save_load_round_trip() -> None:
    layer = _layer(retriever="dnd")
    _, mem = layer(torch.randn(2, 5, 12, dtype=DT), None)
    buf = io.BytesIO()
    torch.save(mem.to_dict(), buf)
    buf.seek(0)
    loaded = FusionMemory.from_dict(torch.load(buf))
    torch.testing.assert_close(loaded.keys, mem.keys, rtol=0, atol=0)
    torch.testing.assert_close(loaded.values, mem.values, rtol=0, atol=0)
    x = torch.randn(2, 5, 12, dtype=DT)
    y1, m1 = layer(x, mem)
    y2, m2 = layer(x, loaded)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(m1.keys, m2.keys, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Causality and batching (layer and model)
# ------------------------------------------------------------------------------------------------


def _lm(memory_layer: int | None = 1, rotary: bool = False, retriever: str = "knn", seed: int = 0) -> FusionLM:
    torch.manual_seed(seed)
    att = FusionConfig(d_model=16, n_heads=2, top_k=3, capacity=64, retriever=retriever, rotary=rotary, gate_init=0.5)
    cfg = FusionLMConfig(vocab_size=11, window=6, n_layers=2, memory_layer=memory_layer, attention=att)
    return FusionLM(cfg).to(DT)


@pytest.mark.parametrize("retriever", sorted(RETRIEVERS))
@pytest.mark.parametrize("rotary", [False, True])
def test_changing_a_future_token_changes_no_earlier_output(retriever: str, rotary: bool) -> None:
    model = _lm(rotary=rotary, retriever=retriever)
    ids = torch.randint(0, 11, (2, 20), generator=torch.Generator().manual_seed(0))
    base, _ = run_segments(model, ids)
    for pos in (3, 6, 13, 19):
        changed = ids.clone()
        changed[:, pos] = (changed[:, pos] + 1) % 11
        out, _ = run_segments(model, changed)
        torch.testing.assert_close(out[:, :pos], base[:, :pos], rtol=0, atol=0)
        assert not torch.allclose(out[:, pos], base[:, pos])  # the change is seen where it is


def test_the_memory_layer_sees_earlier_segments_and_the_baseline_does_not() -> None:
    ids = torch.randint(0, 11, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 11  # a token of segment 0
    for memory_layer, sees in ((1, True), (0, True), (None, False)):
        model = _lm(memory_layer=memory_layer)
        a, _ = run_segments(model, ids)
        b, _ = run_segments(model, changed)
        assert torch.allclose(a[:, 6:], b[:, 6:]) is not sees


@pytest.mark.parametrize("retriever", sorted(RETRIEVERS))
def test_batch_equals_loop_over_samples(retriever: str) -> None:
    model = _lm(retriever=retriever)
    ids = torch.randint(0, 11, (3, 17), generator=torch.Generator().manual_seed(2))
    batched, mem = run_segments(model, ids)
    assert mem is not None
    for i in range(3):
        single, mem_i = run_segments(model, ids[i : i + 1])
        assert mem_i is not None
        torch.testing.assert_close(batched[i : i + 1], single)
        torch.testing.assert_close(mem.keys[i : i + 1], mem_i.keys)
    layer = _layer(retriever=retriever)
    x, m = torch.randn(3, 5, 12, dtype=DT), _memory(3, 3, 8, 4)
    y, _ = layer(x, m)
    for i in range(3):
        yi, _ = layer(x[i : i + 1], FusionMemory(m.keys[i : i + 1], m.values[i : i + 1]))
        torch.testing.assert_close(y[i : i + 1], yi)


def test_run_segments_equals_calling_forward_per_segment() -> None:
    model = _lm()
    ids = torch.randint(0, 11, (2, 15), generator=torch.Generator().manual_seed(4))
    out, mem = run_segments(model, ids, grad_from=2)
    m = None
    parts = []
    for s in range(0, 15, 6):
        logits, m = model(ids[:, s : s + 6], m)
        parts.append(logits)
    torch.testing.assert_close(out, torch.cat(parts, dim=1), rtol=0, atol=0)
    assert m is not None and mem is not None and mem.size == m.size == 15


# ------------------------------------------------------------------------------------------------
# Numerical robustness and gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retriever", sorted(RETRIEVERS))
@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e4])
def test_no_nan_or_inf_forward_backward_on_extreme_inputs(retriever: str, scale: float) -> None:
    layer = _layer(retriever=retriever).float()
    x = (torch.randn(2, 6, 12) * scale).requires_grad_()
    mem = FusionMemory(torch.randn(2, 3, 9, 4) * scale, torch.randn(2, 3, 9, 4) * scale)
    y, mem2 = layer(x, mem)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(mem2.keys).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("retriever", sorted(RETRIEVERS))
def test_gradcheck_float64(retriever: str) -> None:
    layer = _layer(retriever=retriever, top_k=3, rotary=True, gate_init=0.2)
    mem = _memory(1, 3, 5, 4, seed=7)
    params = dict(layer.named_parameters())
    x = torch.randn(1, 3, 12, dtype=DT, requires_grad=True)
    gate = params["gate"].detach().clone().requires_grad_()
    qkv = params["attn.qkv.weight"].detach().clone().requires_grad_()

    def f(x: torch.Tensor, gate: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        p = {**params, "gate": gate, "attn.qkv.weight": qkv}
        return functional_call(layer, p, (x, mem))[0]

    assert torch.autograd.gradcheck(f, (x, gate, qkv), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 5, "capacity": 4},
        {"top_k": 0},
        {"d_model": 10, "n_heads": 3},
        {"retriever": "faiss"},
        {"capacity": 0},
        {"rotary": True, "d_model": 9, "n_heads": 3},
        {"dnd_delta": 0.0},
        {"hopfield_beta": -1.0},
        {"hopfield_steps": -1},
        {"gate_init": float("nan")},
    ],
)
def test_config_rejects_bad_values(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        FusionConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("retriever", [KnnRetriever(1.0), DndRetriever(), HopfieldRetriever(1.0)])
def test_retrievers_reject_empty_memory_large_k_and_mismatched_dims(retriever: object) -> None:
    q, kv = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    for args in [
        (q, kv[:, :0], kv[:, :0], 1),  # empty memory
        (q, kv, kv, 6),  # k > N
        (q, kv, kv, 0),
        (torch.randn(2, 3, 5), kv, kv, 2),  # query width differs
        (torch.randn(1, 3, 4), kv, kv, 2),  # batch differs
        (q, kv, torch.randn(2, 4, 4), 2),  # values do not match keys
    ]:
        with pytest.raises(InvalidInput):
            retriever(*args)  # type: ignore[operator]


def test_layer_rejects_mismatched_memory_and_input() -> None:
    layer = _layer(capacity=8)
    x = torch.randn(2, 3, 12, dtype=DT)
    for bad in [
        _memory(3, 3, 4, 4),  # batch
        _memory(2, 2, 4, 4),  # heads
        _memory(2, 3, 4, 5),  # head width
        _memory(2, 3, 9, 4),  # more than capacity
        FusionMemory(torch.zeros(2, 3, 4, 4, dtype=DT), torch.zeros(2, 3, 5, 4, dtype=DT)),
        FusionMemory(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),  # float32 vs float64 input
    ]:
        with pytest.raises(InvalidInput):
            layer(x, bad)
    with pytest.raises(InvalidInput):
        layer(torch.randn(2, 3, 11, dtype=DT), None)
    with pytest.raises(InvalidInput):
        FusionMemory.from_dict({"keys": torch.zeros(1)})


def test_model_rejects_bad_input() -> None:
    with pytest.raises(InvalidInput):
        FusionLMConfig(vocab_size=11, n_layers=2, memory_layer=2)
    with pytest.raises(InvalidInput):
        FusionLMConfig(vocab_size=11, window=0)
    model = _lm()
    with pytest.raises(InvalidInput):
        model(torch.zeros(1, 7, dtype=torch.long))  # longer than the window
    with pytest.raises(InvalidInput):
        model(torch.full((1, 3), 11))  # id out of the vocabulary
    baseline = _lm(memory_layer=None)
    _, mem = _lm()(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(InvalidInput):
        baseline(torch.zeros(1, 3, dtype=torch.long), mem)
