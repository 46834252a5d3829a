"""KV-MemNN against hand-written loops of Miller et al. 2016's equations; masks, gradients, stability."""

from __future__ import annotations

import io
import math

import pytest
import torch

from memfusion.errors import InvalidInput
from memfusion.neural.kvmemnet import KVMemNN, KVMemNNConfig, key_value_read

DT = torch.float64


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _matvec(w: list[list[float]], x: list[float]) -> list[float]:
    return [_dot(row, x) for row in w]


def _bag(table: list[list[float]], ids: list[int]) -> list[float]:
    """A Phi(x) for a bag of words: the sum of the embeddings of the non-padding tokens."""
    out = [0.0] * len(table[0])
    for t in ids:
        if t != 0:
            out = [o + e for o, e in zip(out, table[t], strict=True)]
    return out


def _reference(
    model: KVMemNN, q: list[float], keys: list[list[float]], values: list[list[float]], mask: list[bool]
) -> tuple[list[float], list[list[float]]]:
    """Embedded inputs in, H hops of key addressing, value reading and q <- R_j (q + o) out."""
    attention = []
    for lin in model.hop_maps:
        idx = [i for i, m in enumerate(mask) if m]
        p_all = [0.0] * len(keys)
        o = [0.0] * len(q)
        if idx:
            logits = [_dot(q, keys[i]) for i in idx]
            m = max(logits)
            z = sum(math.exp(x - m) for x in logits)
            for i, x in zip(idx, logits, strict=True):
                p_all[i] = math.exp(x - m) / z
            o = [sum(p_all[i] * values[i][d] for i in idx) for d in range(len(q))]
        q = _matvec(lin.weight.tolist(), [a + b for a, b in zip(q, o, strict=True)])
        attention.append(p_all)
    return q, attention


def _features_model(hops: int, seed: int = 0) -> KVMemNN:
    torch.manual_seed(seed)
    return KVMemNN(KVMemNNConfig(embed_dim=4, hops=hops, feature_dim=3)).to(DT)


@pytest.mark.parametrize("hops", [1, 2])
def test_feature_hops_equal_the_paper_equations(hops: int) -> None:
    model = _features_model(hops)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 3, generator=g, dtype=DT)
    keys = torch.randn(2, 5, 3, generator=g, dtype=DT)
    values = torch.randn(2, 5, 3, generator=g, dtype=DT)
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    out = model(query, keys, values, mask)
    a = model.embed.table.weight.tolist()  # (d, F)
    for b in range(2):
        want_q, want_p = _reference(
            model,
            _matvec(a, query[b].tolist()),
            [_matvec(a, k) for k in keys[b].tolist()],
            [_matvec(a, v) for v in values[b].tolist()],
            mask[b].tolist(),
        )
        assert out.query[b].tolist() == pytest.approx(want_q, rel=1e-12, abs=1e-14)
        for j in range(hops):
            assert out.attention[b, j].tolist() == pytest.approx(want_p[j], rel=1e-12, abs=1e-14)


def test_token_id_hops_and_scores_equal_the_paper_equations() -> None:
    torch.manual_seed(0)
    model = KVMemNN(KVMemNNConfig(embed_dim=4, hops=2, vocab_size=9)).to(DT)
    g = torch.Generator().manual_seed(2)
    query = torch.randint(0, 9, (2, 4), generator=g)
    keys = torch.randint(0, 9, (2, 3, 5), generator=g)
    values = torch.randint(0, 9, (2, 3, 2), generator=g)
    candidates = torch.randint(0, 9, (6, 3), generator=g)
    out = model(query, keys, values)
    logits = model.score(out.query, candidates)
    e, b_emb = model.embed.table.weight.tolist(), model.answer_embed.table.weight.tolist()
    for b in range(2):
        want_q, _ = _reference(
            model,
            _bag(e, query[b].tolist()),
            [_bag(e, k) for k in keys[b].tolist()],
            [_bag(e, v) for v in values[b].tolist()],
            [True] * 3,
        )
        assert out.query[b].tolist() == pytest.approx(want_q, rel=1e-12, abs=1e-14)
        want_scores = [_dot(out.query[b].tolist(), _bag(b_emb, c)) for c in candidates.tolist()]
        assert logits[b].tolist() == pytest.approx(want_scores, rel=1e-12, abs=1e-14)
    per_question = model.score(out.query, candidates.expand(2, 6, 3))
    torch.testing.assert_close(per_question, logits)


def test_masked_slots_do_not_matter_and_an_empty_row_reads_zero() -> None:
    model = _features_model(2)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 3, generator=g, dtype=DT)
    keys = torch.randn(2, 4, 3, generator=g, dtype=DT)
    values = torch.randn(2, 4, 3, generator=g, dtype=DT)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    out = model(query, keys, values, mask)
    keys2, values2 = keys.clone(), values.clone()
    keys2[:, 2:] = 1e5
    values2[:, 2:] = -1e5
    torch.testing.assert_close(model(query, keys2, values2, mask).query, out.query)
    torch.testing.assert_close(model(query[:1], keys[:1, :2], values[:1, :2]).query, out.query[:1])
    q = model.embed(query[1])
    for lin in model.hop_maps:  # no real slot: o = 0 at every hop
        q = lin(q)
    torch.testing.assert_close(out.query[1], q)
    assert torch.equal(out.attention[1], torch.zeros(2, 4, dtype=DT))


def test_key_value_read_gradcheck() -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, generator=g, dtype=DT, requires_grad=True)
    k = torch.randn(2, 4, 3, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(2, 4, 3, generator=g, dtype=DT, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False] * 4])
    assert torch.autograd.gradcheck(lambda q, k, v: key_value_read(q, k, v, mask), (q, k, v))


def test_hops_gradcheck() -> None:
    model = _features_model(2)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, generator=g, dtype=DT, requires_grad=True)
    k = torch.randn(2, 4, 3, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(2, 4, 3, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: tuple(model(q, k, v)), (q, k, v))


def test_no_nan_or_inf_over_200_extreme_steps() -> None:
    model = KVMemNN(KVMemNNConfig(embed_dim=8, hops=3, feature_dim=5))
    g = torch.Generator().manual_seed(6)
    cands = torch.randn(7, 5, generator=g)
    scales = [0.0, 1e-6, 1.0, 1e3, 1e6]
    for _ in range(200):
        sq, sk, sv = (scales[int(i)] for i in torch.randint(0, 5, (3,), generator=g))
        query = (torch.randn(3, 5, generator=g) * sq).requires_grad_()
        keys = (torch.randn(3, 6, 5, generator=g) * sk).requires_grad_()
        values = (torch.randn(3, 6, 5, generator=g) * sv).requires_grad_()
        mask = torch.rand(3, 6, generator=g) > 0.5
        mask[0] = False
        out = model(query, keys, values, mask)
        logits = model.score(out.query, cands)
        assert torch.isfinite(out.query).all() and torch.isfinite(out.attention).all() and torch.isfinite(logits).all()
        torch.log_softmax(logits, -1)[:, 0].sum().backward()
        for t in (query, keys, values, *model.parameters()):
            assert t.grad is None or torch.isfinite(t.grad).all()
        model.zero_grad()


def test_batching_equals_looping_over_questions() -> None:
    model = _features_model(2)
    g = torch.Generator().manual_seed(7)
    query = torch.randn(4, 3, generator=g, dtype=DT)
    keys = torch.randn(4, 5, 3, generator=g, dtype=DT)
    values = torch.randn(4, 5, 3, generator=g, dtype=DT)
    mask = torch.rand(4, 5, generator=g) > 0.3
    out = model(query, keys, values, mask)
    for b in range(4):
        s = slice(b, b + 1)
        single = model(query[s], keys[s], values[s], mask[s])
        torch.testing.assert_close(single.query, out.query[s])
        torch.testing.assert_close(single.attention, out.attention[s])


def test_module_state_dict_round_trip() -> None:
    a, b = _features_model(2, seed=0), _features_model(2, seed=1)
    x = (torch.randn(2, 3, dtype=DT), torch.randn(2, 4, 3, dtype=DT), torch.randn(2, 4, 3, dtype=DT))
    assert not torch.equal(a(*x).query, b(*x).query)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    torch.testing.assert_close(b(*x).query, a(*x).query, rtol=0, atol=0)


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    model = KVMemNN(KVMemNNConfig(embed_dim=4, feature_dim=3))
    q, k, v = torch.randn(2, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    with pytest.raises(InvalidInput, match="memory is empty"):
        model(q, k[:, :0], v[:, :0])
    with pytest.raises(InvalidInput, match="keys must have feature width 3"):
        model(q, torch.randn(2, 4, 5), v)
    with pytest.raises(InvalidInput, match="keys have 4 slots but values have 2"):
        model(q, k, v[:, :2])
    with pytest.raises(InvalidInput, match="batch"):
        model(q, k[:1], v[:1])
    with pytest.raises(InvalidInput, match="float features"):
        model(q.long(), k, v)
    with pytest.raises(InvalidInput, match="NaN"):
        model(q * float("nan"), k, v)
    with pytest.raises(InvalidInput, match="mask must be \\(B, N\\)"):
        model(q, k, v, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(InvalidInput, match="mask must be a bool"):
        model(q, k, v, torch.ones(2, 4))
    with pytest.raises(InvalidInput, match="no candidates"):
        model.score(torch.randn(2, 4), torch.randn(0, 3))
    ids = KVMemNN(KVMemNNConfig(embed_dim=4, vocab_size=5))
    with pytest.raises(InvalidInput, match=r"token ids must be in 0\.\.4"):
        ids(torch.tensor([[1, 5]]), torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(InvalidInput, match="integer token ids"):
        ids(torch.ones(1, 2), torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(InvalidInput, match="exactly one of vocab_size"):
        KVMemNNConfig(vocab_size=5, feature_dim=3)
    with pytest.raises(InvalidInput, match="exactly one of vocab_size"):
        KVMemNNConfig()
    with pytest.raises(InvalidInput, match="hops must be"):
        KVMemNNConfig(hops=0, feature_dim=3)
