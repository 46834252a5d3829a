"""Quest: the page bound, the selection, its oracle recall, its accounting and its bad input.

References here are brute force over the keys the test itself fed in (never the layer's buffers).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memfusion.kv as kv
from memfusion.errors import InvalidInput
from memfusion.kv import pageattn
from memfusion.kv.hf import MemfusionCache
from memfusion.kv.policy import EvictingLayer
from memfusion.kv.quest import Quest, QuestLayer, round_outward
from memfusion.kv.spec import ModelSpec
from tests.kv.conftest import prompts

SCALE = 0.25


@pytest.fixture(params=["in place", "gathered"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both decode paths of a quest layer: the numba kernels (one-token append, page selection and
    attention reading the selected pages in place; float32 on the CPU) and the torch ops (other
    dtypes, CUDA)."""
    if request.param == "gathered":
        monkeypatch.setattr(pageattn, "serves", lambda q, k: False)
    else:
        assert pageattn.available(), "numba is a dependency: the in-place kernel must be testable"
    return str(request.param)


def _spec(layers: int = 1, heads: int = 4, kv_heads: int = 2, dim: int = 8) -> ModelSpec:
    return ModelSpec("LlamaForCausalLM", layers, heads, kv_heads, dim, torch.float32, torch.device("cpu"))


def _outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """Reference rounding of float32 ``x`` to bfloat16 away from it, as float32: torch's nearest
    bfloat16, moved one bfloat16 step (``nextafter``) where it landed on the wrong side of ``x``."""
    r = x.to(torch.bfloat16)
    wrong = (r.float() < x) if up else (r.float() > x)
    step = torch.nextafter(r, torch.full_like(r, math.inf if up else -math.inf))
    return torch.where(wrong, step, r).float()


def _page_bounds(keys: torch.Tensor, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmin``, ``kmax`` of a page of float32 ``keys (n, D)``: exact, or rounded outward to bfloat16."""
    kmin, kmax = keys.min(dim=0).values, keys.max(dim=0).values
    return (kmin, kmax) if exact else (_outward(kmin, False), _outward(kmax, True))


def _bound(q: torch.Tensor, keys: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """The Quest bound of query ``q (D,)`` for a page of ``keys (n, D)``, elementwise and literal
    (in float64 when ``q`` is)."""
    kmin, kmax = (b.to(q.dtype) for b in _page_bounds(keys, exact))
    return torch.maximum(q * kmin, q * kmax).sum()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 32),
    dim=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_bound_is_above_every_key_of_the_page(n: int, dim: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=g, dtype=torch.float64) * scale
    keys = (torch.randn(n, dim, generator=g) * scale).float()  # float32 keys, as a model's
    dots = keys.double() @ q  # (n,)
    for exact in (True, False):  # exact bounds, and bfloat16 bounds rounded outward
        bound = _bound(q, keys, exact)
        assert bool((bound >= dots - 1e-12 * scale * scale).all())
    if n == 1:
        torch.testing.assert_close(_bound(q, keys), dots[0])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-40, 1e-30, 1e-3, 1.0, 7.0, 1e30, 3e38]))
def test_outward_rounding_is_the_nearest_bfloat16_on_the_right_side(seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(64, generator=g, dtype=torch.float64) * scale).float()  # float32, subnormals and huge included
    x = torch.cat([x, torch.tensor([0.0, -0.0, math.inf, -math.inf, 1.0, -1.0, 3.4028235e38, -3.4028235e38])])
    for up in (True, False):
        got = round_outward(x, up)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.float(), _outward(x, up))
        assert bool(((got.float() >= x) if up else (got.float() <= x)).all())


class Feeder:
    """Drives one QuestLayer and remembers every key/value/validity it fed (the reference)."""

    def __init__(self, cfg: Quest, spec: ModelSpec, batch: int, seed: int) -> None:
        self.layer = cfg.make_layer(0, spec)
        assert isinstance(self.layer, QuestLayer)
        self.spec, self.batch, self.g = spec, batch, torch.Generator().manual_seed(seed)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ok: list[torch.Tensor] = []

    def feed(
        self, m: int, valid: torch.Tensor | None = None, keys: torch.Tensor | None = None, q: torch.Tensor | None = None
    ) -> torch.Tensor:
        s, b = self.spec, self.batch
        k = keys if keys is not None else torch.randn(b, s.num_kv_heads, m, s.head_dim, generator=self.g)
        v = torch.randn(b, s.num_kv_heads, m, s.head_dim, generator=self.g)
        if q is None:
            q = torch.randn(b, s.num_heads, m, s.head_dim, generator=self.g)
        valid = torch.ones(b, m, dtype=torch.bool) if valid is None else valid
        self.k.append(k)
        self.v.append(v)
        self.ok.append(valid)
        out = self.layer.attend(q, k, v, valid, SCALE)
        self.layer.seen += m
        return out

    def all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2), torch.cat(self.ok, dim=1)


def _padded_feeder(cfg: Quest, pad: int = 11, seed: int = 0, decode: int = 3, padded_step: bool = False) -> Feeder:
    """Batch 2 (row 1 left-padded by ``pad`` slots), prefilled in uneven chunks, then ``decode`` steps
    (with ``padded_step``, row 1's last one is padding, as a finished row's)."""
    f = Feeder(cfg, _spec(), batch=2, seed=seed)
    total = 0
    for m in (7, 16, 5, 13):
        valid = torch.ones(2, m, dtype=torch.bool)
        valid[1] = torch.arange(total, total + m) >= pad
        f.feed(m, valid)
        total += m
    for i in range(decode):
        f.feed(1, torch.tensor([[True], [not (padded_step and i == decode - 1)]]))
    return f


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(  # decode 6 opens a page on a decode step; padded_step: a padding token at decode
    ("pad", "decode", "padded_step"), [(11, 3, False), (0, 3, False), (0, 6, False), (0, 6, True), (0, 4, True)]
)
def test_page_bounds_ignore_padding_and_match_brute_force(
    pad: int, decode: int, padded_step: bool, exact: bool, attention_path: str
) -> None:
    cfg = Quest(token_budget=8, page_size=4, dense_layers=0, exact_bounds=exact)
    f = _padded_feeder(cfg, pad=pad, decode=decode, padded_step=padded_step)
    keys, _, ok = f.all()  # (B, Hkv, n, D), (B, n)
    n, S, G = keys.shape[2], cfg.page_size, f.spec.groups
    pages = math.ceil(n / S)
    q = torch.randn(2, f.spec.num_heads, 1, f.spec.head_dim)  # (B, Hq, 1, D)
    got = f.layer.page_scores(q, pages)  # (B, Hkv, pages)
    for b in range(2):
        for h in range(f.spec.num_kv_heads):
            for p in range(pages):
                idx = [i for i in range(p * S, min(n, (p + 1) * S)) if ok[b, i]]
                if not idx:
                    assert got[b, h, p] == -math.inf
                    continue
                page = keys[b, h, idx]  # (n_p, D)
                kmin, kmax = _page_bounds(page, exact)
                assert torch.equal(f.layer.kmin[b, h, p].float(), kmin)
                assert torch.equal(f.layer.kmax[b, h, p].float(), kmax)
                want = sum(_bound(q[b, h * G + g, 0], page, exact) for g in range(G))
                torch.testing.assert_close(got[b, h, p], want, rtol=1e-5, atol=1e-5)
    assert bool((got[1, :, :2] == -math.inf).all()) == (pad > 0)  # row 1's first 8 slots are padding


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("pad", "decode"), [(11, 3), (0, 3), (0, 6)])  # padded; no padding, partial / full page
def test_decode_attends_exactly_to_the_current_page_and_the_top_bound_pages(
    pad: int, decode: int, exact: bool, attention_path: str
) -> None:
    cfg = Quest(token_budget=12, page_size=4, dense_layers=0, exact_bounds=exact)
    f = _padded_feeder(cfg, pad=pad, seed=1, decode=decode)
    q = torch.randn(2, f.spec.num_heads, 1, f.spec.head_dim, generator=torch.Generator().manual_seed(7))
    out = f.feed(1, q=q)  # (B, 1, Hq, D)
    keys, vals, ok = f.all()
    n, S, G, budget = keys.shape[2], cfg.page_size, f.spec.groups, cfg.budget_pages
    cur = (n - 1) // S
    sel = f.layer.last_selection
    assert sel is not None and sel.shape == (2, f.spec.num_kv_heads, budget)
    for b in range(2):
        for h in range(f.spec.num_kv_heads):
            chosen = set(sel[b, h].tolist())
            # Reference selection: the current page plus the best bounds among the others.
            bounds = {}
            for p in range(cur):
                idx = [i for i in range(p * S, (p + 1) * S) if ok[b, i]]
                if idx:
                    bounds[p] = float(sum(_bound(q[b, h * G + g, 0], keys[b, h, idx], exact) for g in range(G)))
            best = sorted(bounds, key=bounds.__getitem__, reverse=True)[: budget - 1]
            assert chosen == {cur, *best}
            # Reference output: softmax attention over the valid keys of those pages only.
            idx = [i for p in sorted(chosen) for i in range(p * S, min(n, (p + 1) * S)) if ok[b, i]]
            for g in range(G):
                hq = h * G + g
                w = torch.softmax(keys[b, h, idx] @ q[b, hq, 0] * SCALE, dim=0)  # (n_sel,)
                torch.testing.assert_close(out[b, 0, hq], w @ vals[b, h, idx], rtol=1e-5, atol=1e-5)


def _planted(
    seed: int, pages: int = 32, S: int = 8, needles: tuple[int, ...] = (3, 17, 25)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``(1, 1, pages*S, D)`` of small noise, except needle pages aligned with the query ``(1, 2, 1, D)``."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    keys = 0.3 * torch.randn(1, 1, pages * S, d, generator=g)  # (1, Hkv, T, D)
    for p in needles:
        keys[0, 0, p * S : (p + 1) * S] += 4.0 * u
    q = 4.0 * u + 0.3 * torch.randn(1, 2, 1, d, generator=g)  # (1, Hq=2, 1, D): one group of 2
    return keys, q


def test_selection_contains_the_oracle_pages_and_reports_recall() -> None:
    S, needles = 8, (3, 17, 25)
    cfg = Quest(token_budget=4 * S, page_size=S, dense_layers=0, oracle_recall=True)
    spec = ModelSpec("LlamaForCausalLM", 1, 2, 1, 16, torch.float32, torch.device("cpu"))
    cache = MemfusionCache(cfg, spec)
    hits = total = 0
    for seed in range(4):
        cache.reset()
        keys, q = _planted(seed, S=S, needles=needles)
        t = keys.shape[2]
        g = torch.Generator().manual_seed(100 + seed)
        vals = torch.randn(1, 1, t + 1, 16, generator=g)
        ok = torch.ones(1, t, dtype=torch.bool)
        cache.attend(0, torch.randn(1, 2, t, 16, generator=g), keys, vals[:, :, :t], ok, SCALE)
        k_new = 0.3 * torch.randn(1, 1, 1, 16, generator=g)
        cache.attend(0, q, k_new, vals[:, :, t:], ok[:, :1], SCALE)
        layer = cache.kv_layers[0]
        assert isinstance(layer, QuestLayer) and layer.last_selection is not None
        sel = set(layer.last_selection[0, 0].tolist())
        assert set(needles) <= sel
        # Brute-force oracle: attention mass per page, summed over the group's two query heads.
        all_k = torch.cat([keys, k_new], dim=2)[0, 0]  # (T+1, D)
        probs = torch.softmax(q[0, :, 0] @ all_k.T * SCALE, dim=-1).sum(dim=0)  # (T+1,)
        mass = torch.zeros(t + S).index_add_(0, torch.arange(t + 1), probs).view(-1, S).sum(dim=1)
        oracle = set(torch.topk(mass, len(sel)).indices.tolist())
        assert set(needles) <= oracle
        hits += len(sel & oracle)
        total += len(sel)
    stats = cache.stats()  # the recall of the last run only (reset clears the layers)
    assert stats.extra["quest_recall"] == pytest.approx(len(sel & oracle) / len(sel))
    assert hits / total >= 0.75


def test_tight_page_counts_are_exact(llama: torch.nn.Module) -> None:
    ids, _ = prompts(2, 30, seed=4)
    new = 7
    cfg = Quest(token_budget=16, page_size=4, dense_layers=1, oracle_recall=True)
    res = kv.generate(llama, ids, cfg, max_new_tokens=new, prefill_chunk=8)
    spec = res.cache.spec
    selected = total = 0
    for n in range(31, 30 + new):  # slots held at each decode step (the prefill selects nothing)
        pages = math.ceil(n / 4)
        selected += min(pages, 4)
        total += pages
    per_step = 2 * spec.num_kv_heads * (spec.num_layers - 1)  # batch x KV heads x quest layers
    assert res.stats.pages_selected == per_step * selected
    assert res.stats.pages_total == per_step * total
    assert 0.0 <= res.stats.extra["quest_recall"] <= 1.0
    assert isinstance(res.cache.kv_layers[0], EvictingLayer)
    assert all(isinstance(la, QuestLayer) for la in res.cache.kv_layers[1:])
    assert res.stats.bytes_resident == cfg.analytic_bytes(30 + new - 1, spec, batch=2)
    # By hand: 36 slots of fp32 K+V in every layer; 9 pages of bfloat16 kmin+kmax in each quest layer.
    h, d, layers = spec.num_kv_heads, spec.head_dim, spec.num_layers
    assert res.stats.bytes_resident == 2 * (layers * 36 * 2 * h * d * 4 + (layers - 1) * 9 * 2 * h * d * 2)


def test_recall_is_not_reported_unless_asked(llama: torch.nn.Module) -> None:
    ids, _ = prompts(1, 24, seed=2)
    res = kv.generate(llama, ids, "quest", token_budget=8, page_size=4, dense_layers=0, max_new_tokens=3)
    assert "quest_recall" not in res.stats.extra
    assert res.stats.pages_selected < res.stats.pages_total


def test_dense_layers_beyond_the_model_make_it_dense() -> None:
    spec = _spec(layers=3)
    cfg = Quest(token_budget=16, page_size=4, dense_layers=5)
    assert all(type(la) is EvictingLayer for la in cfg.make_layers(spec))
    assert cfg.analytic_bytes(50, spec) == kv.resolve("dense").analytic_bytes(50, spec)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"token_budget": 8, "page_size": 16}, r"token_budget \(8\) must be >= page_size \(16\)"),
        ({"page_size": 0}, "page_size must be an integer >= 1, got 0"),
        ({"dense_layers": -1}, "dense_layers must be an integer >= 0, got -1"),
        ({"token_budget": 0}, "token_budget must be an integer >= 1"),
        ({"page_size": 4.0}, "page_size must be an integer"),
        ({"oracle_recall": "yes"}, "oracle_recall must be True or False"),
        ({"exact_bounds": 1}, "exact_bounds must be True or False, got 1"),
    ],
)
def test_bad_parameters_are_rejected(params: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        kv.resolve("quest", **params)


def test_a_padding_query_among_padding_pages_attends_to_itself(attention_path: str) -> None:
    """As in every dense kernel (``causal_tail``): a padding query with nothing valid sees its own key."""
    spec = _spec()
    f = Feeder(Quest(token_budget=4, page_size=4, dense_layers=0), spec, batch=2, seed=3)
    pad = torch.tensor([[True] * 12, [False] * 12])  # row 1: padding only
    f.feed(12, pad)
    out = f.feed(1, torch.tensor([[True], [False]]))  # (B, 1, Hq, D)
    assert f.layer.last_selection is not None  # 4 pages > a budget of 1 page: the selecting path
    _, vals, _ = f.all()
    for hq in range(spec.num_heads):
        torch.testing.assert_close(out[1, 0, hq], vals[1, hq // spec.groups, -1])


def test_decode_attention_is_timed_per_step_and_layer(llama: torch.nn.Module) -> None:
    """The benchmark's medians read ``decode_attend_steps``: one entry per decode step and layer,
    summing to the cumulative ``decode_attend_seconds``; prefill chunks are not counted."""
    ids, mask = prompts(1, 40)
    res = kv.generate(
        llama, ids, "quest", attention_mask=mask, max_new_tokens=6, prefill_chunk=16, token_budget=16, page_size=4
    )
    steps = res.cache.decode_attend_steps
    assert [len(s) for s in steps] == [5] * len(steps) and all(t > 0 for s in steps for t in s)
    for layer, total in zip(steps, res.cache.decode_attend_seconds, strict=True):
        assert sum(layer) == pytest.approx(total)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "d", "pages", "keep", "last"), [(1, 8, 2, 64, 300, 37, 16), (2, 6, 2, 12, 50, 9, 5)]
)
def test_selection_and_attention_in_one_call_equal_the_two_calls(
    b: int, hq: int, hkv: int, d: int, pages: int, keep: int, last: int, exact: bool
) -> None:
    """``select_and_attend`` (one compiled call, unpadded decode steps) against ``select_pages`` then
    ``page_attention``: the same pages and the same output, with the current page partly written;
    float32 bounds and bfloat16 ones."""
    g = torch.Generator().manual_seed(pages)
    s, cap = 16, pages + 3
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, cap, s, d, generator=g)
    v = torch.randn(b, hkv, cap, s, d, generator=g)
    kmin, kmax = k.amin(dim=3), k.amax(dim=3)  # (B, Hkv, C, D)
    if not exact:
        kmin, kmax = round_outward(kmin, False), round_outward(kmax, True)
    out, sel = pageattn.select_and_attend(q, pageattn.host_views(k, v, kmin, kmax), pages, keep, last, SCALE)
    ref_sel = pageattn.select_pages(q, kmin, kmax, None, pages, keep)
    assert torch.equal(sel, ref_sel)
    assert (sel[..., -1] == pages).all() and sel.shape == (b, hkv, keep + 1)
    ref = pageattn.page_attention(q, k, v, ref_sel, last, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
