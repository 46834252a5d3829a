"""The addressing functions against hand-written references (plain Python / numpy loops written from the
paper equations), their exact semantics on hand-computed cases, gradchecks and input validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from memfusion.errors import InvalidInput
from memfusion.neural import functional as fn

EPS = 1e-6
DT = torch.float64


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=rng(seed), dtype=DT)


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=rng(seed), dtype=DT)


def distribution(*shape: int, seed: int = 0) -> Tensor:
    return torch.softmax(2 * randn(*shape, seed=seed), dim=-1)


# ---------------------------------------------------------------------------------- references


def ref_cosine(k: np.ndarray, row: np.ndarray) -> float:
    kn = np.sqrt(sum(v * v for v in k) + EPS**2)
    rn = np.sqrt(sum(v * v for v in row) + EPS**2)
    return float(sum(a * b for a, b in zip(k, row, strict=True)) / (kn * rn + EPS))


def ref_softmax(z: list[float]) -> np.ndarray:
    z_arr = np.asarray(z)
    e = np.exp(z_arr - z_arr.max())
    return e / e.sum()


def ref_content(memory: np.ndarray, key: np.ndarray, beta: float) -> np.ndarray:
    return ref_softmax([beta * ref_cosine(key, memory[i]) for i in range(memory.shape[0])])


def ref_allocation(usage: np.ndarray) -> np.ndarray:
    u = EPS + (1 - EPS) * usage
    order = sorted(range(len(u)), key=lambda i: (u[i], i))  # ascending usage, ties by index
    a = np.zeros(len(u))
    prod = 1.0
    for slot in order:
        a[slot] = (1 - u[slot]) * prod
        prod *= u[slot]
    return a


# ---------------------------------------------------------------------------------- content, read, write


def test_cosine_similarity_matches_loop_and_is_zero_for_zero_rows() -> None:
    memory = randn(2, 5, 4, seed=1)
    memory[0, 2] = 0.0
    keys = randn(2, 3, 4, seed=2)
    keys[1, 0] = 0.0
    got = fn.cosine_similarity(keys, memory).numpy()
    m, k = memory.numpy(), keys.numpy()
    for b in range(2):
        for h in range(3):
            for i in range(5):
                assert got[b, h, i] == pytest.approx(ref_cosine(k[b, h], m[b, i]), abs=1e-12)
    assert np.all(got[0, :, 2] == 0.0) and np.all(got[1, 0] == 0.0)
    assert np.all(np.abs(got) <= 1.0)


def test_content_address_matches_loop() -> None:
    memory, keys, beta = randn(3, 6, 4, seed=1), randn(3, 2, 4, seed=2), rand(3, 2, seed=3, high=10)
    got = fn.content_address(memory, keys, beta).numpy()
    for b in range(3):
        for h in range(2):
            np.testing.assert_allclose(got[b, h], ref_content(memory[b].numpy(), keys[b, h].numpy(), float(beta[b, h])))


def test_content_address_sharp_key_finds_its_row() -> None:
    memory = randn(1, 8, 5, seed=4)
    keys = memory[:, [3, 6]] * 2.5  # (1, 2, 5): scaled copies of rows 3 and 6
    w = fn.content_address(memory, keys, torch.full((1, 2), 200.0, dtype=DT))
    assert w.argmax(-1).tolist() == [[3, 6]]
    assert float(w[0, 0, 3]) > 0.99


def test_weighted_read_matches_loop() -> None:
    memory, w = randn(2, 5, 3, seed=1), distribution(2, 4, 5, seed=2)
    got = fn.weighted_read(memory, w)
    for b in range(2):
        for h in range(4):
            expected = sum(float(w[b, h, i]) * memory[b, i] for i in range(5))
            torch.testing.assert_close(got[b, h], expected)


def test_erase_add_write_matches_sequential_paper_equations() -> None:
    b_, h_, n, m = 2, 3, 5, 4
    memory, w = randn(b_, n, m, seed=1), distribution(b_, h_, n, seed=2)
    erase, add = rand(b_, h_, m, seed=3), randn(b_, h_, m, seed=4)
    got = fn.erase_add_write(memory, w, erase, add).numpy()
    for b in range(b_):
        mem = memory[b].numpy().copy()
        for h in range(h_):  # Graves 2014 eq. 3, one head after the other (the product commutes)
            for i in range(n):
                for j in range(m):
                    mem[i, j] *= 1 - float(w[b, h, i]) * float(erase[b, h, j])
        for h in range(h_):  # eq. 4
            for i in range(n):
                for j in range(m):
                    mem[i, j] += float(w[b, h, i]) * float(add[b, h, j])
        np.testing.assert_allclose(got[b], mem, rtol=1e-12, atol=1e-12)


def test_erase_add_write_full_erase_of_one_hot_slot_replaces_it() -> None:
    memory = randn(1, 4, 3, seed=1)
    w = torch.zeros(1, 1, 4, dtype=DT)
    w[0, 0, 2] = 1.0
    add = randn(1, 1, 3, seed=2)
    new = fn.erase_add_write(memory, w, torch.ones(1, 1, 3, dtype=DT), add)
    torch.testing.assert_close(new[0, 2], add[0, 0])
    torch.testing.assert_close(new[0, [0, 1, 3]], memory[0, [0, 1, 3]])


# ---------------------------------------------------------------------------------- NTM location addressing


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("slot", [0, 1, 4])
def test_circular_shift_plus_one_moves_focus_to_next_slot_wrapping(n: int, slot: int) -> None:
    slot = slot % n
    w = torch.zeros(1, n, dtype=DT)
    w[0, slot] = 1.0
    plus_one = torch.tensor([[0.0, 0.0, 1.0]], dtype=DT)  # offsets -1, 0, +1
    minus_one = torch.tensor([[1.0, 0.0, 0.0]], dtype=DT)
    assert int(fn.circular_shift(w, plus_one).argmax()) == (slot + 1) % n
    assert int(fn.circular_shift(w, minus_one).argmax()) == (slot - 1) % n
    assert float(fn.circular_shift(w, plus_one).max()) == 1.0


@pytest.mark.parametrize("s", [1, 3, 5])
def test_circular_shift_matches_np_roll(s: int) -> None:
    w, shift = distribution(3, 2, 7, seed=1), distribution(3, 2, s, seed=2)
    got = fn.circular_shift(w, shift).numpy()
    for b in range(3):
        for h in range(2):
            expected = sum(float(shift[b, h, k]) * np.roll(w[b, h].numpy(), k - s // 2) for k in range(s))
            np.testing.assert_allclose(got[b, h], expected, rtol=1e-12)


def test_sharpen_matches_power_formula() -> None:
    w = rand(3, 6, seed=1, low=0.05, high=1.0)
    gamma = rand(3, 1, seed=2, low=1.0, high=5.0)
    got = fn.sharpen(w, gamma).numpy()
    for b in range(3):
        powered = [float(w[b, i]) ** float(gamma[b, 0]) for i in range(6)]
        np.testing.assert_allclose(got[b], np.array(powered) / sum(powered), rtol=1e-4)


def test_sharpen_huge_gamma_and_zero_weights_stay_finite_in_float32() -> None:
    w = torch.softmax(torch.randn(4, 128, generator=rng(1)), -1)
    w[0, :64] = 0.0  # exact zeros: a plain w ** gamma has a NaN gamma-gradient here (log 0)
    w.requires_grad_(True)
    gamma = torch.tensor([[1.0], [50.0], [500.0], [1e4]], requires_grad=True)
    out = fn.sharpen(w, gamma)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(4))
    assert int(out[3].argmax()) == int(w[3].argmax())
    (out * torch.randn(4, 128, generator=rng(2))).sum().backward()
    assert w.grad is not None and gamma.grad is not None
    assert torch.isfinite(w.grad).all() and torch.isfinite(gamma.grad).all()


def test_ntm_address_matches_step_by_step_reference() -> None:
    b_, n, m, s = 3, 7, 4, 3
    memory, key = randn(b_, n, m, seed=1), randn(b_, m, seed=2)
    beta, gate = rand(b_, 1, seed=3, high=5), rand(b_, 1, seed=4)
    shift, gamma, prev = distribution(b_, s, seed=5), rand(b_, 1, seed=6, low=1, high=3), distribution(b_, n, seed=7)
    got = fn.ntm_address(memory, key, beta, gate, shift, gamma, prev).numpy()
    for b in range(b_):
        wc = ref_content(memory[b].numpy(), key[b].numpy(), float(beta[b, 0]))
        g = float(gate[b, 0])
        wg = g * wc + (1 - g) * prev[b].numpy()
        wt = sum(float(shift[b, k]) * np.roll(wg, k - s // 2) for k in range(s))
        powered = (wt + EPS) ** float(gamma[b, 0])  # the documented eps of sharpen
        np.testing.assert_allclose(got[b], powered / powered.sum(), rtol=1e-10)


def test_ntm_address_pure_location_mode_shifts_previous_focus() -> None:
    """gate = 0 ignores content; a one-hot shift by +1 and large gamma move the focus one slot on."""
    memory = randn(1, 6, 3, seed=1)
    prev = torch.zeros(1, 6, dtype=DT)
    prev[0, 5] = 1.0
    out = fn.ntm_address(
        memory,
        randn(1, 3, seed=2),
        torch.ones(1, 1, dtype=DT),
        torch.zeros(1, 1, dtype=DT),
        torch.tensor([[0.0, 0.0, 1.0]], dtype=DT),
        torch.full((1, 1), 20.0, dtype=DT),
        prev,
    )
    assert int(out.argmax()) == 0 and float(out[0, 0]) > 0.999


# ---------------------------------------------------------------------------------- DNC


def test_dnc_allocation_hand_computed_four_slots() -> None:
    usage = torch.tensor([[0.5, 0.2, 0.9, 0.4]], dtype=DT)
    # order by usage: slot 1 (0.2), slot 3 (0.4), slot 0 (0.5), slot 2 (0.9)
    expected = torch.tensor([[0.5 * 0.2 * 0.4, 0.8, 0.1 * 0.2 * 0.4 * 0.5, 0.6 * 0.2]], dtype=DT)
    torch.testing.assert_close(fn.dnc_allocation(usage), expected, atol=1e-5, rtol=0)
    assert float(fn.dnc_allocation(usage).sum()) == pytest.approx(1 - 0.5 * 0.2 * 0.9 * 0.4, abs=1e-5)


def test_dnc_allocation_ties_and_free_slots() -> None:
    ties = fn.dnc_allocation(torch.tensor([[0.3, 0.3, 0.3]], dtype=DT))
    torch.testing.assert_close(ties, torch.tensor([[0.7, 0.21, 0.063]], dtype=DT), atol=1e-5, rtol=0)
    free = fn.dnc_allocation(torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=DT))
    assert float(free[0, 1]) == pytest.approx(1.0, abs=1e-5)  # first free slot (lowest index) is allocated
    assert float(free[0, 3]) < 1e-5
    full = fn.dnc_allocation(torch.ones(1, 4, dtype=DT))  # a full memory allocates (almost) nothing
    assert float(full.sum()) < 1e-5 and torch.isfinite(full).all()


def test_dnc_allocation_matches_loop_reference() -> None:
    usage = rand(5, 9, seed=3)
    usage[0, :3] = 0.0
    usage[1, 2:5] = 1.0
    got = fn.dnc_allocation(usage).numpy()
    for b in range(5):
        np.testing.assert_allclose(got[b], ref_allocation(usage[b].numpy()), rtol=1e-10, atol=1e-15)


def test_dnc_retention_and_usage_match_loops() -> None:
    b_, r, w_, n = 2, 3, 2, 5
    prev_usage, free = rand(b_, n, seed=1), rand(b_, r, seed=2)
    read_w, write_w = distribution(b_, r, n, seed=3), distribution(b_, w_, n, seed=4)
    psi = fn.dnc_retention(free, read_w).numpy()
    usage = fn.dnc_usage(prev_usage, write_w, free, read_w).numpy()
    for b in range(b_):
        for i in range(n):
            p = 1.0
            for h in range(r):
                p *= 1 - float(free[b, h]) * float(read_w[b, h, i])
            assert psi[b, i] == pytest.approx(p, rel=1e-12)
            u = float(prev_usage[b, i])
            for h in range(w_):  # each write head: u + w - u w
                ww = float(write_w[b, h, i])
                u = u + ww - u * ww
            assert usage[b, i] == pytest.approx(u * p, rel=1e-12)


def test_dnc_usage_stops_gradient_into_write_weights_only() -> None:
    prev_usage = rand(2, 5, seed=1).requires_grad_(True)
    write_w = distribution(2, 1, 5, seed=2).requires_grad_(True)
    free = rand(2, 3, seed=3).requires_grad_(True)
    read_w = distribution(2, 3, 5, seed=4).requires_grad_(True)
    out = fn.dnc_usage(prev_usage, write_w, free, read_w).sum()
    grads = torch.autograd.grad(out, [prev_usage, write_w, free, read_w], allow_unused=True)
    assert grads[1] is None
    assert all(g is not None and bool(g.abs().sum() > 0) for g in (grads[0], grads[2], grads[3]))


def test_dnc_write_weights_match_loop_with_two_heads() -> None:
    b_, w_, n = 3, 2, 6
    usage, content = rand(b_, n, seed=1), distribution(b_, w_, n, seed=2)
    gw, ga = rand(b_, w_, seed=3), rand(b_, w_, seed=4)
    got = fn.dnc_write_weights(usage, content, gw, ga).numpy()
    for b in range(b_):
        u = usage[b].numpy().copy()
        for h in range(w_):
            a = ref_allocation(u)
            g_w, g_a = float(gw[b, h]), float(ga[b, h])
            np.testing.assert_allclose(got[b, h], g_w * (g_a * a + (1 - g_a) * content[b, h].numpy()), rtol=1e-10)
            u = u + (1 - u) * g_w * g_a * a


def test_dnc_link_and_precedence_match_loops() -> None:
    b_, w_, n = 2, 2, 4
    link = rand(b_, w_, n, n, seed=1) * 0.3
    prec, write_w = distribution(b_, w_, n, seed=2) * 0.7, distribution(b_, w_, n, seed=3)
    new_link = fn.dnc_link(link, prec, write_w).numpy()
    new_prec = fn.dnc_precedence(prec, write_w).numpy()
    for b in range(b_):
        for h in range(w_):
            w, p = write_w[b, h].numpy(), prec[b, h].numpy()
            for i in range(n):
                for j in range(n):
                    expected = 0.0 if i == j else (1 - w[i] - w[j]) * float(link[b, h, i, j]) + w[i] * p[j]
                    assert new_link[b, h, i, j] == pytest.approx(expected, abs=1e-14)
            np.testing.assert_allclose(new_prec[b, h], (1 - w.sum()) * p + w, rtol=1e-12)


def test_dnc_link_records_write_order_for_forward_and_backward_reads() -> None:
    n = 4
    link, prec = torch.zeros(1, 1, n, n, dtype=DT), torch.zeros(1, 1, n, dtype=DT)
    for slot in (2, 0, 3):  # write slot 2, then 0, then 3
        w = torch.zeros(1, 1, n, dtype=DT)
        w[0, 0, slot] = 1.0
        link, prec = fn.dnc_link(link, prec, w), fn.dnc_precedence(prec, w)
    assert float(link[0, 0, 0, 2]) == 1.0 and float(link[0, 0, 3, 0]) == 1.0
    read_at_0 = torch.zeros(1, 1, n, dtype=DT)
    read_at_0[0, 0, 0] = 1.0
    assert int(fn.dnc_forward_weights(link, read_at_0).argmax()) == 3  # written after slot 0
    assert int(fn.dnc_backward_weights(link, read_at_0).argmax()) == 2  # written before slot 0


def test_dnc_directional_and_read_weights_match_loops() -> None:
    b_, r, w_, n = 2, 3, 2, 5
    link, read_w = rand(b_, w_, n, n, seed=1), distribution(b_, r, n, seed=2)
    fwd, bwd = fn.dnc_forward_weights(link, read_w).numpy(), fn.dnc_backward_weights(link, read_w).numpy()
    content, modes = distribution(b_, r, n, seed=3), distribution(b_, r, 2 * w_ + 1, seed=4)
    mixed = fn.dnc_read_weights(content, torch.from_numpy(fwd), torch.from_numpy(bwd), modes).numpy()
    for b in range(b_):
        for h in range(r):
            expected = float(modes[b, h, 2 * w_]) * content[b, h].numpy()
            for k in range(w_):
                big_l, wr = link[b, k].numpy(), read_w[b, h].numpy()
                f = [sum(big_l[i, j] * wr[j] for j in range(n)) for i in range(n)]
                bk = [sum(big_l[j, i] * wr[j] for j in range(n)) for i in range(n)]
                np.testing.assert_allclose(fwd[b, h, k], f, rtol=1e-12)
                np.testing.assert_allclose(bwd[b, h, k], bk, rtol=1e-12)
                expected = expected + float(modes[b, h, k]) * np.array(bk) + float(modes[b, h, w_ + k]) * np.array(f)
            np.testing.assert_allclose(mixed[b, h], expected, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_sparse_topk_keeps_k_largest_renormalised(k: int) -> None:
    w = distribution(3, 2, 5, seed=1)
    got = fn.sparse_topk(w, k).numpy()
    for b in range(3):
        for h in range(2):
            row = w[b, h].numpy()
            keep = sorted(range(5), key=lambda i: -row[i])[:k]
            expected = np.zeros(5)
            total = sum(row[i] for i in keep)
            for i in keep:
                expected[i] = row[i] / (total + EPS)
            np.testing.assert_allclose(got[b, h], expected, rtol=1e-12)
            assert (got[b, h] > 0).sum() == k


# ---------------------------------------------------------------------------------- LRUA


def test_lrua_usage_matches_formula() -> None:
    prev, rw, ww = rand(2, 6, seed=1), distribution(2, 3, 6, seed=2), distribution(2, 3, 6, seed=3)
    got = fn.lrua_usage(prev, rw, ww, 0.9).numpy()
    for b in range(2):
        for i in range(6):
            expected = 0.9 * float(prev[b, i]) + sum(float(rw[b, h, i]) + float(ww[b, h, i]) for h in range(3))
            assert got[b, i] == pytest.approx(expected, rel=1e-12)


def test_lrua_least_used_marks_the_n_smallest_slots() -> None:
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.2], [1.0, 1.0, 0.0, 1.0, 1.0]], dtype=DT)
    got = fn.lrua_least_used(usage, 2)
    assert got.tolist() == [[0, 1, 0, 0, 1], [1, 0, 1, 0, 0]]  # ties broken by the lower slot index
    assert fn.lrua_least_used(usage, 5).sum().item() == 10


def test_lrua_write_weights_match_formula() -> None:
    alpha, prev_read = randn(2, 3, seed=1), distribution(2, 3, 4, seed=2)
    lu = fn.lrua_least_used(rand(2, 4, seed=3), 3)
    got = fn.lrua_write_weights(alpha, prev_read, lu).numpy()
    for b in range(2):
        for h in range(3):
            s = 1 / (1 + np.exp(-float(alpha[b, h])))
            np.testing.assert_allclose(got[b, h], s * prev_read[b, h].numpy() + (1 - s) * lu[b].numpy(), rtol=1e-12)


# ---------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    s=st.sampled_from([1, 3, 5]),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([0.0, 1e-8, 1.0, 1e4]),
)
def test_addressing_weights_are_distributions(n: int, s: int, seed: int, scale: float) -> None:
    memory, key = scale * randn(2, n, 3, seed=seed), scale * randn(2, 3, seed=seed + 1)
    out = fn.ntm_address(
        memory,
        key,
        rand(2, 1, seed=seed, high=100),
        rand(2, 1, seed=seed + 2),
        distribution(2, s, seed=seed),
        rand(2, 1, seed=seed + 3, low=1, high=50),
        distribution(2, n, seed=seed + 4),
    )
    assert torch.isfinite(out).all() and bool((out >= 0).all())
    torch.testing.assert_close(out.sum(-1), torch.ones(2, dtype=DT))
    alloc = fn.dnc_allocation(rand(2, n, seed=seed) * (scale > 0))
    assert bool((alloc >= 0).all()) and bool((alloc.sum(-1) <= 1 + 1e-12).all())


# ---------------------------------------------------------------------------------- gradients


def _req(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.clone().requires_grad_(True) for t in ts)


GRADCHECK_CASES: dict[str, Callable[[], tuple[Callable[..., Tensor], tuple[Tensor, ...]]]] = {
    "cosine_similarity": lambda: (fn.cosine_similarity, _req(randn(2, 3, 4, seed=1), randn(2, 5, 4, seed=2))),
    "content_address": lambda: (
        fn.content_address,
        _req(randn(2, 5, 4, seed=1), randn(2, 3, 4, seed=2), rand(2, 3, seed=3, low=0.5, high=4)),
    ),
    "weighted_read": lambda: (fn.weighted_read, _req(randn(2, 5, 3, seed=1), distribution(2, 2, 5, seed=2))),
    "erase_add_write": lambda: (
        fn.erase_add_write,
        _req(randn(2, 5, 3, seed=1), distribution(2, 2, 5, seed=2), rand(2, 2, 3, seed=3), randn(2, 2, 3, seed=4)),
    ),
    "circular_shift": lambda: (fn.circular_shift, _req(distribution(2, 6, seed=1), distribution(2, 3, seed=2))),
    "sharpen": lambda: (fn.sharpen, _req(distribution(2, 6, seed=1), rand(2, 1, seed=2, low=1.2, high=3))),
    "ntm_address": lambda: (
        fn.ntm_address,
        _req(
            randn(2, 6, 4, seed=1),
            randn(2, 4, seed=2),
            rand(2, 1, seed=3, low=0.5, high=3),
            rand(2, 1, seed=4, low=0.1, high=0.9),
            distribution(2, 3, seed=5),
            rand(2, 1, seed=6, low=1.2, high=3),
            distribution(2, 6, seed=7),
        ),
    ),
    "dnc_retention": lambda: (fn.dnc_retention, _req(rand(2, 3, seed=1), distribution(2, 3, 5, seed=2))),
    "dnc_usage": lambda: (
        lambda u, f, r: fn.dnc_usage(u, distribution(2, 1, 5, seed=9), f, r),
        _req(rand(2, 5, seed=1), rand(2, 3, seed=2), distribution(2, 3, 5, seed=3)),
    ),
    "dnc_allocation": lambda: (fn.dnc_allocation, _req(rand(3, 6, seed=1, low=0.05, high=0.95))),
    "dnc_write_weights": lambda: (
        fn.dnc_write_weights,
        _req(
            rand(2, 5, seed=1, low=0.05, high=0.95),
            distribution(2, 2, 5, seed=2),
            rand(2, 2, seed=3),
            rand(2, 2, seed=4),
        ),
    ),
    "dnc_link": lambda: (
        fn.dnc_link,
        _req(rand(2, 1, 4, 4, seed=1) * 0.3, distribution(2, 1, 4, seed=2), distribution(2, 1, 4, seed=3)),
    ),
    "dnc_precedence": lambda: (fn.dnc_precedence, _req(distribution(2, 2, 4, seed=1), distribution(2, 2, 4, seed=2))),
    "dnc_forward_weights": lambda: (
        fn.dnc_forward_weights,
        _req(rand(2, 2, 4, 4, seed=1), distribution(2, 3, 4, seed=2)),
    ),
    "dnc_backward_weights": lambda: (
        fn.dnc_backward_weights,
        _req(rand(2, 2, 4, 4, seed=1), distribution(2, 3, 4, seed=2)),
    ),
    "dnc_read_weights": lambda: (
        fn.dnc_read_weights,
        _req(
            distribution(2, 3, 4, seed=1),
            distribution(2, 3, 1, 4, seed=2),
            distribution(2, 3, 1, 4, seed=3),
            distribution(2, 3, 3, seed=4),
        ),
    ),
    "sparse_topk": lambda: (lambda w: fn.sparse_topk(w, 2), _req(distribution(2, 3, 6, seed=1))),
    "lrua_usage": lambda: (
        lambda u, r, w: fn.lrua_usage(u, r, w, 0.95),
        _req(rand(2, 5, seed=1), distribution(2, 2, 5, seed=2), distribution(2, 2, 5, seed=3)),
    ),
    "lrua_write_weights": lambda: (
        fn.lrua_write_weights,
        _req(randn(2, 3, seed=1), distribution(2, 3, 5, seed=2), fn.lrua_least_used(rand(2, 5, seed=3), 3)),
    ),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck(name: str) -> None:
    func, inputs = GRADCHECK_CASES[name]()
    assert torch.autograd.gradcheck(func, inputs, eps=1e-6, atol=1e-5)


def test_gradients_finite_at_degenerate_points() -> None:
    """All-zero memory and keys, saturated gates (exactly 0 / 1), one-hot weights, full and empty usage."""
    memory = torch.zeros(2, 5, 3, dtype=DT, requires_grad=True)
    key = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    prev = torch.zeros(2, 5, dtype=DT)
    prev[:, 0] = 1.0
    prev.requires_grad_(True)
    gate = torch.tensor([[0.0], [1.0]], dtype=DT, requires_grad=True)
    shift = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=DT, requires_grad=True)
    beta = torch.tensor([[0.0], [1e6]], dtype=DT, requires_grad=True)
    gamma = torch.tensor([[1.0], [1e3]], dtype=DT, requires_grad=True)
    w = fn.ntm_address(memory, key, beta, gate, shift, gamma, prev)
    written = fn.erase_add_write(memory, w.unsqueeze(1), torch.ones(2, 1, 3, dtype=DT), torch.ones(2, 1, 3, dtype=DT))
    usage = torch.tensor([[0.0] * 5, [1.0] * 5], dtype=DT, requires_grad=True)
    alloc = fn.dnc_allocation(usage)
    total = w.sum() + written.sum() + (alloc * torch.arange(5, dtype=DT)).sum()
    grads = torch.autograd.grad(total, [memory, key, prev, gate, shift, beta, gamma, usage])
    for g in grads:
        assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------------- validation


def _bad_calls() -> list[tuple[str, Callable[[], object], str]]:
    mem, key3 = randn(2, 5, 4), randn(2, 3, 4)
    ok_beta = rand(2, 3)
    one, s3, prev = torch.ones(2, 1, dtype=DT), distribution(2, 3), distribution(2, 5)
    return [
        ("memory rank", lambda: fn.content_address(mem[0], key3, ok_beta), "memory must be (B, N, M)"),
        ("empty memory", lambda: fn.content_address(mem[:, :0], key3, ok_beta), "N = 0"),
        ("key width", lambda: fn.content_address(mem, randn(2, 3, 5), ok_beta), "keys must be (B, H, M)"),
        ("beta shape", lambda: fn.content_address(mem, key3, rand(2, 4)), "beta must be (B, H)"),
        ("negative beta", lambda: fn.content_address(mem, key3, -ok_beta), "beta (key strength) must be >= 0"),
        ("erase shape", lambda: fn.erase_add_write(mem, distribution(2, 1, 5), rand(2, 1, 3), randn(2, 1, 4)), "erase"),
        ("gamma < 1", lambda: fn.ntm_address(mem, randn(2, 4), one, one, s3, 0.5 * one, prev), "gamma"),
        ("ntm negative beta", lambda: fn.ntm_address(mem, randn(2, 4), -one, one, s3, one, prev), "beta"),
        ("ntm prev", lambda: fn.ntm_address(mem, randn(2, 4), one, one, s3, one, distribution(2, 6)), "prev"),
        ("ntm empty", lambda: fn.ntm_address(mem[:, :0], randn(2, 4), one, one, s3, one, prev[:, :0]), "N = 0"),
        ("sharpen gamma", lambda: fn.sharpen(prev, 0.9 * one), "gamma"),
        ("shift dims", lambda: fn.circular_shift(prev, distribution(3, 3)), "shift must be"),
        ("allocation empty", lambda: fn.dnc_allocation(torch.zeros(2, 0)), "N = 0"),
        ("allocation rank", lambda: fn.dnc_allocation(torch.zeros(5)), "usage must be (B, N)"),
        (
            "usage mismatch",
            lambda: fn.dnc_usage(rand(2, 5), distribution(2, 1, 6), rand(2, 3), distribution(2, 3, 5)),
            "N=5",
        ),
        (
            "link shape",
            lambda: fn.dnc_link(rand(2, 1, 4, 5), distribution(2, 1, 4), distribution(2, 1, 4)),
            "prev_link",
        ),
        (
            "modes size",
            lambda: fn.dnc_read_weights(
                distribution(2, 3, 4), rand(2, 3, 1, 4), rand(2, 3, 1, 4), distribution(2, 3, 4)
            ),
            "2W + 1",
        ),
        ("top-k > N", lambda: fn.sparse_topk(distribution(2, 3, 4), 5), "k must be in [1, N]"),
        ("top-k = 0", lambda: fn.sparse_topk(distribution(2, 3, 4), 0), "k must be in [1, N]"),
        ("least used n > N", lambda: fn.lrua_least_used(rand(2, 4), 5), "n must be in [1, N]"),
        ("lrua gamma", lambda: fn.lrua_usage(rand(2, 4), distribution(2, 1, 4), distribution(2, 1, 4), 1.5), "gamma"),
        ("lrua alpha", lambda: fn.lrua_write_weights(randn(2, 2), distribution(2, 3, 4), rand(2, 4)), "alpha"),
    ]


@pytest.mark.parametrize(("case", "call", "message"), _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_invalid_input_with_clear_message(case: str, call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        call()
    assert message in str(info.value), f"{case}: {info.value}"


def test_existing_functions_unchanged() -> None:
    """hopfield_retrieve / dnd_kernel keep their semantics (other modules depend on them)."""
    patterns, query = randn(1, 4, 3, seed=1), randn(1, 3, seed=2)
    expected = torch.softmax(2.0 * patterns[0] @ query[0], 0) @ patterns[0]
    torch.testing.assert_close(fn.hopfield_retrieve(patterns, query, 2.0)[0], expected)
    torch.testing.assert_close(fn.dnd_kernel(query, patterns)[0], 1 / ((patterns[0] - query[0]).pow(2).sum(-1) + 1e-3))
