"""DND against a plain-Python dictionary written from the NEC paper; HNSW recall; gradients; stability."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from memfusion.errors import InvalidInput
from memfusion.neural.dnd import DND, DNDConfig, DNDState

DT = torch.float64


class _RefDND:
    """One write at a time, one lookup batch at a time, every distance by a loop (Pritzel et al. 2017)."""

    def __init__(self, capacity: int, k: int, delta: float, alpha: float, tol: float) -> None:
        self.capacity, self.k, self.delta, self.alpha, self.tol = capacity, k, delta, alpha, tol
        self.keys: list[list[float]] = []
        self.values: list[list[float]] = []
        self.last: list[int] = []
        self.clock = 0

    def write(self, key: list[float], value: list[float]) -> None:
        self.clock += 1
        best = None
        for i, stored in enumerate(self.keys):
            d = math.dist(key, stored)
            if d <= self.tol and (best is None or d < best[0]):
                best = (d, i)
        if best is not None:
            i = best[1]
            self.values[i] = [q + self.alpha * (v - q) for q, v in zip(self.values[i], value, strict=True)]
        elif len(self.keys) < self.capacity:
            i = len(self.keys)
            self.keys.append(list(key))
            self.values.append(list(value))
            self.last.append(0)
        else:
            i = min(range(self.capacity), key=lambda s: (self.last[s], s))  # least recently used
            self.keys[i], self.values[i] = list(key), list(value)
        self.last[i] = self.clock

    def lookup(self, queries: list[list[float]]) -> list[list[float]]:
        self.clock += 1
        outs = []
        for q in queries:
            order = sorted(range(len(self.keys)), key=lambda i: math.dist(q, self.keys[i]))[: self.k]
            kern = [1.0 / (math.dist(q, self.keys[i]) ** 2 + self.delta) for i in order]
            w = [x / sum(kern) for x in kern]
            outs.append([sum(wi * self.values[i][d] for wi, i in zip(w, order, strict=True)) for d in range(2)])
            for i in order:
                self.last[i] = self.clock
        return outs


def _assert_same(state: DNDState, ref: _RefDND) -> None:
    n = int(state.size)
    assert n == len(ref.keys) and int(state.clock) == ref.clock
    assert state.keys[:n].tolist() == ref.keys
    assert state.last_used[:n].tolist() == ref.last
    for got, want in zip(state.values[:n].tolist(), ref.values, strict=True):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_batched_writes_and_lookups_equal_the_reference_one_at_a_time(seed: int) -> None:
    """Random batches over a small pool of keys (so keys repeat, within a batch too), a capacity that
    forces evictions, lookups in between: the state and every lookup match the loop reference."""
    g = torch.Generator().manual_seed(seed)
    tol = [0.0, 0.05][seed % 2]
    cfg = DNDConfig(key_size=3, value_size=2, capacity=6, num_neighbours=2, delta=1e-3, alpha=0.3, match_tol=tol)
    dnd, ref = DND(cfg), _RefDND(6, 2, 1e-3, 0.3, tol)
    pool = torch.randn(10, 3, generator=g, dtype=DT)
    state = dnd.initial_state(dtype=DT)
    for _ in range(15):
        b = int(torch.randint(1, 9, (1,), generator=g))  # up to more than the capacity in one batch
        keys = pool[torch.randint(0, 10, (b,), generator=g)]
        keys = keys + tol * 0.5 * torch.rand(b, 1, generator=g, dtype=DT) * (seed % 2)  # within tol of the pool
        values = torch.randn(b, 2, generator=g, dtype=DT)
        state = dnd.write(state, keys, values)
        for key, value in zip(keys.tolist(), values.tolist(), strict=True):
            ref.write(key, value)
        _assert_same(state, ref)
        if int(state.size) >= 2 and bool(torch.rand(1, generator=g) < 0.5):
            q = torch.randn(3, 3, generator=g, dtype=DT)
            out, state = dnd.lookup(state, q)
            for got, want in zip(out.tolist(), ref.lookup(q.tolist()), strict=True):
                assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
            _assert_same(state, ref)


def test_lookup_equals_brute_force_knn_with_the_kernel() -> None:
    g = torch.Generator().manual_seed(1)
    dnd = DND(DNDConfig(key_size=4, value_size=2, capacity=50, num_neighbours=5, delta=0.01))
    state = dnd.write(
        dnd.initial_state(dtype=DT),
        torch.randn(40, 4, generator=g, dtype=DT),
        torch.randn(40, 2, generator=g, dtype=DT),
    )
    q = torch.randn(6, 4, generator=g, dtype=DT)
    out, _ = dnd.lookup(state, q)
    slots, weights = dnd.neighbours(state, q)
    keys, values = state.keys[:40].tolist(), state.values[:40].tolist()
    for b, query in enumerate(q.tolist()):
        dist = [sum((x - y) ** 2 for x, y in zip(query, key, strict=True)) for key in keys]
        near = sorted(range(40), key=lambda i: dist[i])[:5]
        kern = [1.0 / (dist[i] + 0.01) for i in near]
        w = [x / sum(kern) for x in kern]
        assert sorted(slots[b].tolist()) == sorted(near)
        assert sorted(weights[b].tolist()) == pytest.approx(sorted(w), rel=1e-12)
        want = [sum(wi * values[i][d] for wi, i in zip(w, near, strict=True)) for d in range(2)]
        assert out[b].tolist() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_update_in_place_moves_the_value_by_alpha() -> None:
    dnd = DND(DNDConfig(key_size=2, value_size=1, capacity=4, num_neighbours=1, alpha=0.25, match_tol=0.1))
    s = dnd.write(dnd.initial_state(dtype=DT), torch.tensor([[1.0, 2.0]], dtype=DT), torch.tensor([[4.0]], dtype=DT))
    s = dnd.write(s, torch.tensor([[1.05, 2.0]], dtype=DT), torch.tensor([[8.0]], dtype=DT))  # within tol
    assert int(s.size) == 1
    assert s.keys[0].tolist() == [1.0, 2.0]  # the stored key is kept
    assert s.values[0].item() == pytest.approx(4.0 + 0.25 * (8.0 - 4.0))
    s = dnd.write(s, torch.tensor([[1.2, 2.0]], dtype=DT), torch.tensor([[0.0]], dtype=DT))  # outside tol
    assert int(s.size) == 2 and s.values[0].item() == pytest.approx(5.0)


def test_lru_eviction_order_at_capacity() -> None:
    dnd = DND(DNDConfig(key_size=4, value_size=1, capacity=3, num_neighbours=1))
    e = torch.eye(4, dtype=DT)
    s = dnd.write(dnd.initial_state(dtype=DT), e[:3], torch.tensor([[0.0], [1.0], [2.0]], dtype=DT))
    _, s = dnd.lookup(s, e[:1] + 0.01)  # refreshes slot 0: slot 1 is now the least recently used
    assert s.ages.tolist() == [0, 2, 1]
    s = dnd.write(s, e[3:4], torch.tensor([[3.0]], dtype=DT))
    assert s.keys.tolist() == [e[0].tolist(), e[3].tolist(), e[2].tolist()]
    s = dnd.write(s, -e[:1], torch.tensor([[4.0]], dtype=DT))  # then slot 2
    assert s.keys.tolist() == [e[0].tolist(), e[3].tolist(), (-e[0]).tolist()]
    s = dnd.write(s, e[1:3], torch.tensor([[5.0], [6.0]], dtype=DT))  # then 0, then 1 (one batch)
    assert s.keys.tolist() == [e[1].tolist(), e[2].tolist(), (-e[0]).tolist()]
    assert s.values[:, 0].tolist() == [5.0, 6.0, 4.0]


def test_a_batch_larger_than_the_capacity_keeps_its_last_keys() -> None:
    dnd = DND(DNDConfig(key_size=5, value_size=1, capacity=2, num_neighbours=1))
    e = torch.eye(5, dtype=DT)
    s = dnd.write(dnd.initial_state(dtype=DT), e, torch.arange(5, dtype=DT).unsqueeze(-1))
    assert s.keys.tolist() == [e[4].tolist(), e[3].tolist()]
    assert s.values[:, 0].tolist() == [4.0, 3.0] and s.last_used.tolist() == [5, 4]


def test_lookup_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    dnd = DND(DNDConfig(key_size=3, value_size=2, capacity=8, num_neighbours=3, delta=0.1))
    state = dnd.write(
        dnd.initial_state(dtype=DT), torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    )
    q = torch.randn(2, 3, generator=g, dtype=DT, requires_grad=True)
    keys = state.keys.clone().requires_grad_()
    values = state.values.clone().requires_grad_()

    def f(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return dnd.lookup(dataclasses.replace(state, keys=keys, values=values), q)[0]

    assert torch.autograd.gradcheck(f, (q, keys, values))


def test_write_gradcheck() -> None:
    """The new values depend on the written values and the old values (Q += alpha (v - Q))."""
    dnd = DND(DNDConfig(key_size=2, value_size=2, capacity=4, num_neighbours=1, alpha=0.3))
    g = torch.Generator().manual_seed(3)
    state = dnd.write(dnd.initial_state(dtype=DT), torch.eye(2, dtype=DT), torch.randn(2, 2, generator=g, dtype=DT))
    keys = torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 0.0]], dtype=DT)
    old = state.values.clone().requires_grad_()
    new = torch.randn(3, 2, generator=g, dtype=DT, requires_grad=True)

    def f(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return dnd.write(dataclasses.replace(state, values=old), keys, new).values

    assert torch.autograd.gradcheck(f, (old, new))


def test_no_nan_or_inf_over_200_extreme_steps() -> None:
    dnd = DND(DNDConfig(key_size=4, value_size=2, capacity=32, num_neighbours=4, delta=1e-3))
    g = torch.Generator().manual_seed(4)
    state = dnd.initial_state()
    scales = [0.0, 1e-6, 1.0, 1e3, 1e6]
    for step in range(200):
        scale = scales[int(torch.randint(0, 5, (1,), generator=g))]
        keys = torch.randn(3, 4, generator=g) * scale
        values = (torch.randn(3, 2, generator=g) * scale).requires_grad_()
        state = dnd.write(state.detach(), keys, values)
        if int(state.size) >= 4:
            q = (torch.randn(5, 4, generator=g) * scale).requires_grad_()
            leaf = state.values.detach().requires_grad_()
            out, state = dnd.lookup(dataclasses.replace(state, values=leaf), q)
            assert torch.isfinite(out).all(), f"step {step}"
            out.sum().backward()
            assert torch.isfinite(q.grad).all() and torch.isfinite(leaf.grad).all()  # type: ignore[arg-type]
    assert torch.isfinite(state.values).all() and torch.isfinite(state.keys).all()


def test_lookup_batch_equals_one_query_at_a_time() -> None:
    g = torch.Generator().manual_seed(5)
    dnd = DND(DNDConfig(key_size=4, value_size=2, capacity=30, num_neighbours=3))
    state = dnd.write(
        dnd.initial_state(dtype=DT),
        torch.randn(20, 4, generator=g, dtype=DT),
        torch.randn(20, 2, generator=g, dtype=DT),
    )
    q = torch.randn(5, 4, generator=g, dtype=DT)
    out, _ = dnd.lookup(state, q)
    for b in range(5):
        single, _ = dnd.lookup(state, q[b : b + 1])
        torch.testing.assert_close(single[0], out[b])


def test_state_save_load_round_trip() -> None:
    g = torch.Generator().manual_seed(6)
    dnd = DND(DNDConfig(key_size=4, value_size=2, capacity=30, num_neighbours=3))
    state = dnd.write(dnd.initial_state(), torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g))
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    buf.seek(0)
    loaded = DNDState.from_dict(torch.load(buf))
    for name, value in state.to_dict().items():
        assert torch.equal(getattr(loaded, name), value), name
    q = torch.randn(4, 4, generator=g)
    torch.testing.assert_close(dnd.lookup(loaded, q)[0], dnd.lookup(state, q)[0], rtol=0, atol=0)
    fresh = DND(DNDConfig(key_size=4, value_size=2, capacity=30, num_neighbours=3))
    fresh.load_state_dict(dnd.state_dict())  # the module holds no parameters: the state is the memory


def _recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)) / a.numel()


def test_hnsw_recall_on_5000_random_keys_and_incremental_updates() -> None:
    g = torch.Generator().manual_seed(7)
    cfg = DNDConfig(key_size=32, value_size=1, capacity=6000, num_neighbours=10, approximate=True)
    approx, exact = DND(cfg), DND(dataclasses.replace(cfg, approximate=False))
    state = approx.write(approx.initial_state(), torch.randn(5000, 32, generator=g), torch.randn(5000, 1, generator=g))
    q = torch.randn(200, 32, generator=g)
    slots, weights = approx.neighbours(state, q)
    recall = _recall(slots, exact.neighbours(state, q)[0])
    print(f"HNSW recall@10 on 5000 keys: {recall:.4f}")
    assert recall >= 0.9
    # the kernel weights are computed on exact distances of the returned neighbours
    kern = 1.0 / ((state.keys[slots] - q.unsqueeze(1)).pow(2).sum(-1) + cfg.delta)
    torch.testing.assert_close(weights, kern / kern.sum(-1, keepdim=True))

    index = approx._cache
    new_keys = torch.randn(1500, 32, generator=g) + 10.0  # fills to capacity, then evicts 500 old keys
    state = approx.write(state, new_keys, torch.randn(1500, 1, generator=g))
    assert approx._cache is index, "the index is updated in place, not rebuilt"
    slots, _ = approx.neighbours(state, new_keys[-200:])
    assert torch.equal(state.keys[slots[:, 0]], new_keys[-200:]), "a written key is its own nearest neighbour"
    recall = _recall(slots, exact.neighbours(state, new_keys[-200:])[0])
    assert recall >= 0.9
    slots, _ = approx.neighbours(state, q)
    assert _recall(slots, exact.neighbours(state, q)[0]) >= 0.9  # evicted keys are never returned

    with torch.no_grad():
        state.keys.neg_()  # changed in place (as by an optimizer): the index is rebuilt
    slots, _ = approx.neighbours(state, -q)
    assert approx._cache is not index
    assert _recall(slots, exact.neighbours(state, -q)[0]) >= 0.9


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    dnd = DND(DNDConfig(key_size=3, value_size=2, capacity=5, num_neighbours=3))
    empty = dnd.initial_state()
    with pytest.raises(InvalidInput, match="empty"):
        dnd.lookup(empty, torch.randn(1, 3))
    state = dnd.write(empty, torch.randn(2, 3), torch.randn(2, 2))
    with pytest.raises(InvalidInput, match="num_neighbours k = 3 is larger than the 2 keys"):
        dnd.lookup(state, torch.randn(1, 3))
    state = dnd.write(state, torch.randn(1, 3), torch.randn(1, 2))
    with pytest.raises(InvalidInput, match="query must be"):
        dnd.lookup(state, torch.randn(1, 4))
    with pytest.raises(InvalidInput, match="dtype"):
        dnd.lookup(state, torch.randn(1, 3, dtype=DT))
    with pytest.raises(InvalidInput, match="NaN"):
        dnd.lookup(state, torch.full((1, 3), float("nan")))
    with pytest.raises(InvalidInput, match="values must be"):
        dnd.write(state, torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(InvalidInput, match="keys must be"):
        dnd.write(state, torch.randn(2, 4), torch.randn(2, 2))
    with pytest.raises(InvalidInput, match="NaN"):
        dnd.write(state, torch.full((1, 3), float("inf")), torch.randn(1, 2))
    with pytest.raises(InvalidInput, match=r"state\.keys must be"):
        DND(DNDConfig(key_size=3, value_size=2, capacity=6, num_neighbours=3)).lookup(state, torch.randn(1, 3))
    with pytest.raises(InvalidInput, match="num_neighbours \\(9\\) must be <= capacity"):
        DNDConfig(key_size=3, capacity=5, num_neighbours=9)
    with pytest.raises(InvalidInput, match="delta must be > 0"):
        DNDConfig(key_size=3, delta=0.0)
    with pytest.raises(InvalidInput, match="alpha must be in"):
        DNDConfig(key_size=3, alpha=1.5)
