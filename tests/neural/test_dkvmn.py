"""DKVMN against a hand-written loop of the paper's equations; leakage, padding, gradients, stability."""

from __future__ import annotations

import io
import math

import pytest
import torch

from memfusion.errors import InvalidInput
from memfusion.neural.dkvmn import DKVMN, DKVMNConfig, DKVMNState

DT = torch.float64
Q = 5


def _model(seed: int = 0, **kw: object) -> DKVMN:
    torch.manual_seed(seed)
    cfg = DKVMNConfig(num_questions=Q, memory_size=3, key_size=4, value_size=5, summary_size=6, **kw)  # type: ignore[arg-type]
    return DKVMN(cfg).to(DT)


def _matvec(w: list[list[float]], x: list[float], b: list[float]) -> list[float]:
    return [sum(wi * xi for wi, xi in zip(row, x, strict=True)) + bi for row, bi in zip(w, b, strict=True)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _reference(model: DKVMN, qs: list[int], rs: list[int]) -> tuple[list[float], list[list[float]]]:
    """Zhang et al. 2017, one student, one step at a time, plain floats."""
    mk = model.key_memory.tolist()
    mv = model.initial_value_memory.tolist()
    a_emb, b_emb = model.question_embed.weight.tolist(), model.interaction_embed.weight.tolist()
    ew, eb = model.erase.weight.tolist(), model.erase.bias.tolist()
    aw, ab = model.add.weight.tolist(), model.add.bias.tolist()
    w1, b1 = model.summary.weight.tolist(), model.summary.bias.tolist()
    w2, b2 = model.predictor.weight.tolist(), model.predictor.bias.tolist()
    n, dv = len(mk), len(mv[0])
    ps = []
    for q, r in zip(qs, rs, strict=True):
        if q == 0:  # padding: no prediction, no write
            ps.append(0.0)
            continue
        k = a_emb[q]
        logits = [sum(x * y for x, y in zip(k, mk[i], strict=True)) for i in range(n)]
        m = max(logits)
        z = sum(math.exp(x - m) for x in logits)
        w = [math.exp(x - m) / z for x in logits]
        read = [sum(w[i] * mv[i][d] for i in range(n)) for d in range(dv)]
        f = [math.tanh(x) for x in _matvec(w1, read + k, b1)]
        ps.append(_sigmoid(_matvec(w2, f, b2)[0]))
        v = b_emb[q + Q * r]
        e = [_sigmoid(x) for x in _matvec(ew, v, eb)]
        a = [math.tanh(x) for x in _matvec(aw, v, ab)]
        mv = [[mv[i][d] * (1 - w[i] * e[d]) + w[i] * a[d] for d in range(dv)] for i in range(n)]
    return ps, mv


def test_read_and_write_equal_the_paper_equations() -> None:
    model = _model()
    questions = torch.tensor([[2, 4, 1], [3, 0, 3]])  # the second student has a padded step
    responses = torch.tensor([[1, 0, 1], [0, -1, 1]])  # -1 at padding is ignored
    p, state = model.predict(questions, responses)
    for b in range(2):
        want_p, want_mv = _reference(model, questions[b].tolist(), responses[b].tolist())
        assert p[b].tolist() == pytest.approx(want_p, rel=1e-12, abs=1e-14)
        for got_row, want_row in zip(state.value_memory[b].tolist(), want_mv, strict=True):
            assert got_row == pytest.approx(want_row, rel=1e-12, abs=1e-14)


def test_no_leakage_of_the_current_response() -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    questions = torch.randint(1, Q + 1, (3, 6), generator=g)
    responses = torch.randint(0, 2, (3, 6), generator=g)
    p, _ = model.predict(questions, responses)
    for t in range(6):
        flipped = responses.clone()
        flipped[:, t] = 1 - flipped[:, t]
        p2, _ = model.predict(questions, flipped)
        torch.testing.assert_close(p2[:, : t + 1], p[:, : t + 1], rtol=0, atol=0)
        if t + 1 < 6:
            assert (p2[:, t + 1] - p[:, t + 1]).abs().min() > 0, f"r_{t} does not reach p_{t + 1}"


def test_padding_anywhere_is_skipped() -> None:
    model = _model()
    questions = torch.tensor([[2, 0, 4, 0, 1]])
    responses = torch.tensor([[1, 1, 0, 0, 1]])
    p, state = model.predict(questions, responses)
    dense_p, dense_state = model.predict(torch.tensor([[2, 4, 1]]), torch.tensor([[1, 0, 1]]))
    torch.testing.assert_close(p[:, [0, 2, 4]], dense_p)
    assert p[0, 1] == 0 and p[0, 3] == 0
    torch.testing.assert_close(state.value_memory, dense_state.value_memory)


def test_step_forward_and_predict_agree() -> None:
    model = _model()
    g = torch.Generator().manual_seed(2)
    questions = torch.randint(0, Q + 1, (2, 5), generator=g)
    responses = torch.randint(0, 2, (2, 5), generator=g)
    p, final = model.predict(questions, responses)
    y, final2 = model(torch.stack([questions, responses], dim=-1))
    torch.testing.assert_close(y.squeeze(-1), p)
    torch.testing.assert_close(final2.value_memory, final.value_memory)
    state = model.initial_state(2)
    for t in range(5):
        pt, state = model.step(torch.stack([questions[:, t], responses[:, t]], dim=-1), state)
        torch.testing.assert_close(pt[:, 0], p[:, t])
    torch.testing.assert_close(state.value_memory, final.value_memory)
    logits, _ = model.predict_logits(questions, responses)
    torch.testing.assert_close(torch.sigmoid(logits) * (questions > 0), p)


def test_batching_equals_looping_over_students() -> None:
    model = _model()
    g = torch.Generator().manual_seed(3)
    questions = torch.randint(0, Q + 1, (4, 7), generator=g)
    responses = torch.randint(0, 2, (4, 7), generator=g)
    p, state = model.predict(questions, responses)
    for b in range(4):
        pb, sb = model.predict(questions[b : b + 1], responses[b : b + 1])
        torch.testing.assert_close(pb, p[b : b + 1])
        torch.testing.assert_close(sb.value_memory, state.value_memory[b : b + 1])


def test_gradcheck_of_read_and_write() -> None:
    """Gradients through two read/write steps w.r.t. the value memory, the key memory, and the erase
    and add weights."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    x = torch.stack([torch.tensor([[2, 4], [1, 0]]), torch.tensor([[1, 0], [0, 1]])], dim=-1)  # (B, T, 2)
    mv = torch.randn(2, 3, 5, generator=g, dtype=DT, requires_grad=True)
    mk = model.key_memory.detach().clone().requires_grad_()
    ew = model.erase.weight.detach().clone().requires_grad_()
    aw = model.add.weight.detach().clone().requires_grad_()

    def f(mv: torch.Tensor, mk: torch.Tensor, ew: torch.Tensor, aw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = {"key_memory": mk, "erase.weight": ew, "add.weight": aw}
        p, state = torch.func.functional_call(model, params, (x, DKVMNState(value_memory=mv)))
        return p, state.value_memory

    assert torch.autograd.gradcheck(f, (mv, mk, ew, aw))


@pytest.mark.parametrize("scale", [0.0, 1e6])
def test_no_nan_or_inf_over_200_extreme_steps(scale: float) -> None:
    """Saturated correlation weights (huge keys), a zero or huge memory, saturated gates."""
    model = _model()
    with torch.no_grad():
        model.key_memory.mul_(1e4)
        model.question_embed.weight.mul_(1e3)
        model.interaction_embed.weight.mul_(1e4)
    g = torch.Generator().manual_seed(5)
    mv = (torch.randn(2, 3, 5, generator=g, dtype=DT) * scale).requires_grad_()
    state = DKVMNState(value_memory=mv)
    total = torch.zeros((), dtype=DT)
    for _ in range(200):
        x = torch.stack([torch.randint(0, Q + 1, (2,), generator=g), torch.randint(0, 2, (2,), generator=g)], -1)
        p, state = model.step(x, state)
        assert torch.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
        total = total + p.sum()
    assert torch.isfinite(state.value_memory).all()
    total.backward()
    assert torch.isfinite(mv.grad).all()  # type: ignore[arg-type]
    for name, prm in model.named_parameters():
        assert prm.grad is None or torch.isfinite(prm.grad).all(), name


def test_state_save_load_continues_the_sequence() -> None:
    model = _model()
    g = torch.Generator().manual_seed(6)
    questions = torch.randint(1, Q + 1, (2, 8), generator=g)
    responses = torch.randint(0, 2, (2, 8), generator=g)
    p, _ = model.predict(questions, responses)
    _, half = model.predict(questions[:, :4], responses[:, :4])
    buf = io.BytesIO()
    torch.save(half.detach().to_dict(), buf)
    buf.seek(0)
    loaded = DKVMNState.from_dict(torch.load(buf))
    p2, _ = model.predict(questions[:, 4:], responses[:, 4:], loaded)
    torch.testing.assert_close(p2, p[:, 4:], rtol=0, atol=0)


def test_module_state_dict_round_trip() -> None:
    a, b = _model(seed=0), _model(seed=1)
    questions, responses = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]])
    assert not torch.equal(a.predict(questions, responses)[0], b.predict(questions, responses)[0])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    torch.testing.assert_close(b.predict(questions, responses)[0], a.predict(questions, responses)[0], rtol=0, atol=0)


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    model = _model()
    q, r = torch.tensor([[1, 2]]), torch.tensor([[0, 1]])
    with pytest.raises(InvalidInput, match=r"question ids must be in 0\.\.5"):
        model.predict(torch.tensor([[1, 6]]), r)
    with pytest.raises(InvalidInput, match="responses must be 0 or 1"):
        model.predict(q, torch.tensor([[0, 2]]))
    with pytest.raises(InvalidInput, match="responses must have the shape"):
        model.predict(q, torch.tensor([[0, 1, 1]]))
    with pytest.raises(InvalidInput, match="integer tensors"):
        model.predict(q.double(), r)
    with pytest.raises(InvalidInput, match="questions must be"):
        model.predict(torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(InvalidInput, match=r"state\.value_memory must be"):
        model.predict(q, r, DKVMNState(value_memory=torch.zeros(1, 4, 5, dtype=DT)))
    with pytest.raises(InvalidInput, match="expects x of shape"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(InvalidInput, match="num_questions must be"):
        DKVMNConfig(num_questions=0)
    with pytest.raises(InvalidInput, match="dropout"):
        DKVMNConfig(num_questions=3, dropout=1.0)
    with pytest.raises(InvalidInput, match="exactly the fields"):
        DKVMNState.from_dict({"memory": torch.zeros(1)})
