"""snapkv, h2o and cca layers against brute-force references written here with plain softmax.

The layers are driven directly with synthetic q/k/v (no model): each chunk goes through
``attend``; the reference keeps a list of tokens per (sequence, KV head), recomputes every
attention row by hand and applies the policy's rule as stated in its docstring. Kept positions
must match exactly, outputs and pooled core tokens to float tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import memfusion.kv as kv
from memfusion.errors import InvalidInput
from memfusion.kv.cca import CCA
from memfusion.kv.h2o import H2O
from memfusion.kv.policy import EvictingLayer, PolicyConfig
from memfusion.kv.snapkv import SnapKV
from memfusion.kv.spec import ModelSpec
from tests.kv.conftest import prompts

HQ, HKV, D = 4, 2, 8
G = HQ // HKV
SCALE = 1.0 / math.sqrt(D)
SPEC = ModelSpec("LlamaForCausalLM", 1, HQ, HKV, D, torch.float32, torch.device("cpu"))

Entry = dict[str, Any]  # pos, k, v, count, score (the reference's token)
Rows = list[list[list[Entry]]]  # [batch][kv head] -> resident tokens


def stream(batch: int, length: int, pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q ``(B, Hq, T, D)`` (peaky), k/v ``(B, Hkv, T, D)``, valid ``(B, T)`` (row 1 left-padded)."""
    g = torch.Generator().manual_seed(seed)
    q = 2.0 * torch.randn(batch, HQ, length, D, generator=g)
    k = torch.randn(batch, HKV, length, D, generator=g)
    v = torch.randn(batch, HKV, length, D, generator=g)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        valid[1, :pad] = False
    return q, k, v, valid


def chunks(length: int, prefill: int, chunk: int) -> list[slice]:
    """Prefill ``[0, prefill)`` in chunks of ``chunk``, then one token at a time (decode)."""
    out = [slice(s, min(s + chunk, prefill)) for s in range(0, prefill, chunk)]
    return out + [slice(t, t + 1) for t in range(prefill, length)]


def ref_attend(rows: Rows, seen: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Append the chunk's real tokens, attend by hand (logit bias log(count)).

    Returns out ``(B, Tq, Hq, D)`` (zeros for padding queries) and per (b, h) the probabilities
    ``(G, Tq, N)`` over that row's entries (zeros for padding queries and masked keys).
    """
    b_, _, tq, _ = q.shape
    out = torch.zeros(b_, tq, HQ, D, dtype=torch.float64)
    probs: list[list[torch.Tensor]] = []
    for b in range(b_):
        qpos: dict[int, int] = {}
        for t in range(tq):
            if valid[b, t]:
                qpos[t], seen[b] = seen[b], seen[b] + 1
        probs.append([])
        for h in range(HKV):
            for t, p in qpos.items():
                rows[b][h].append({"pos": p, "k": k[b, h, t].double(), "v": v[b, h, t].double(), "count": 1.0,
                                   "score": 0.0})
            ents = rows[b][h]
            keys = torch.stack([e["k"] for e in ents])  # (N, D)
            vals = torch.stack([e["v"] for e in ents])
            bias = torch.tensor([math.log(e["count"]) for e in ents], dtype=torch.float64)
            kpos = torch.tensor([e["pos"] for e in ents])
            p_bh = torch.zeros(G, tq, len(ents), dtype=torch.float64)
            for t, p in qpos.items():
                for g in range(G):
                    logits = keys @ q[b, h * G + g, t].double() * SCALE + bias
                    logits[kpos > p] = -math.inf
                    w = torch.softmax(logits, dim=0)
                    p_bh[g, t] = w
                    out[b, t, h * G + g] = w @ vals
            probs[b].append(p_bh)
    return out, probs


def keep_top(ents: list[Entry], budget: int, protected: Callable[[Entry], bool]) -> list[Entry]:
    if len(ents) <= budget:
        return ents
    prot = [e for e in ents if protected(e)]
    rest = sorted((e for e in ents if not protected(e)), key=lambda e: -e["score"])
    return prot + rest[: budget - len(prot)]


def h2o_rule(cfg: H2O) -> Callable[[list[Entry], torch.Tensor, int, int], list[Entry]]:
    def rule(ents: list[Entry], p: torch.Tensor, newest: int, tq: int) -> list[Entry]:
        for j, e in enumerate(ents):
            e["score"] += float(p[:, :, j].sum())
        return keep_top(ents, cfg.budget, lambda e: e["pos"] > newest - cfg.recent)

    return rule


def snapkv_rule(cfg: SnapKV) -> Callable[[list[Entry], torch.Tensor, int, int], list[Entry]]:
    def in_window(e: Entry, newest: int) -> bool:
        return bool(e["pos"] > newest - cfg.obs_window)

    def rule(ents: list[Entry], p: torch.Tensor, newest: int, tq: int) -> list[Entry]:
        if tq == 1:
            for j, e in enumerate(ents):
                e["score"] += float(p[:, :, j].sum())
        else:
            w = min(cfg.obs_window, tq)
            votes = [0.0 if in_window(e, newest) else float(p[:, tq - w :, j].sum()) for j, e in enumerate(ents)]
            order = sorted(range(len(ents)), key=lambda j: ents[j]["pos"])
            r = cfg.pool_kernel // 2
            for i, j in enumerate(order):  # average over the kernel, zeros outside
                ents[j]["score"] = sum(votes[order[m]] for m in range(max(0, i - r), min(len(order), i + r + 1)))
                ents[j]["score"] /= cfg.pool_kernel
        return keep_top(ents, cfg.budget, lambda e: in_window(e, newest))

    return rule


def cca_rule(cfg: CCA) -> Callable[[list[Entry], torch.Tensor, int, int], list[Entry]]:
    def rule(ents: list[Entry], p: torch.Tensor, newest: int, tq: int) -> list[Entry]:
        for j, e in enumerate(ents):
            e["score"] += float(p[:, :, j].sum())
        old = sorted((e for e in ents if e["count"] == 1 and e["pos"] <= newest - cfg.local), key=lambda e: e["pos"])
        gs = cfg.group_size
        for s in range(0, len(old) - gs + 1, gs):
            group = old[s : s + gs]
            imp = torch.tensor([e["score"] for e in group], dtype=torch.float64)
            w = imp / imp.sum()
            core = {"pos": group[-1]["pos"], "count": float(gs), "score": float(imp.sum()),
                    "k": sum(wi * e["k"] for wi, e in zip(w, group, strict=True)),
                    "v": sum(wi * e["v"] for wi, e in zip(w, group, strict=True))}
            ents = [e for e in ents if not any(e is m for m in group)] + [core]
        return ents

    return rule


def run_both(cfg: PolicyConfig, rule: Callable[[list[Entry], torch.Tensor, int, int], list[Entry]],
             batch: int, length: int, prefill: int, chunk: int, pad: int = 0, seed: int = 0,
             ) -> tuple[EvictingLayer, Rows]:
    """Drive the layer and the reference over the same stream; outputs must agree at every step."""
    q, k, v, valid = stream(batch, length, pad, seed)
    layer = cfg.make_layer(0, SPEC)
    assert isinstance(layer, EvictingLayer)
    rows: Rows = [[[] for _ in range(HKV)] for _ in range(batch)]
    seen = [0] * batch
    for sl in chunks(length, prefill, chunk):
        qc, kc, vc, vm = q[:, :, sl], k[:, :, sl], v[:, :, sl], valid[:, sl]
        out = layer.attend(qc, kc, vc, vm, SCALE)
        layer.seen += qc.shape[2]
        ref_out, probs = ref_attend(rows, seen, qc, kc, vc, vm)
        torch.testing.assert_close(out.double()[vm], ref_out[vm], atol=1e-5, rtol=1e-5)
        for b in range(batch):
            for h in range(HKV):
                rows[b][h] = rule(rows[b][h], probs[b][h], seen[b] - 1, qc.shape[2])
    return layer, rows


def resident(layer: EvictingLayer, b: int, h: int) -> dict[int, int]:
    """pos -> index in the store of the valid resident tokens of (b, h)."""
    assert layer.store is not None
    pos, ok = layer.store["pos"][b, h], layer.store["valid"][b, h]
    return {int(pos[i]): i for i in range(layer.store.n) if ok[i]}


def assert_same_tokens(layer: EvictingLayer, rows: Rows) -> None:
    assert layer.store is not None
    for b, per_head in enumerate(rows):
        for h, ents in enumerate(per_head):
            got = resident(layer, b, h)
            assert set(got) == {e["pos"] for e in ents}, (b, h)
            for e in ents:
                i = got[e["pos"]]
                torch.testing.assert_close(layer.store["k"][b, h, i].double(), e["k"], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(layer.store["v"][b, h, i].double(), e["v"], atol=1e-5, rtol=1e-5)


# --- h2o ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "pad", "chunk"), [(1, 0, 7), (2, 5, 6), (1, 0, 30)])
def test_h2o_keeps_heavy_hitters_and_recent(batch: int, pad: int, chunk: int) -> None:
    cfg = H2O(budget=12, recent=4)
    layer, rows = run_both(cfg, h2o_rule(cfg), batch, length=36, prefill=30, chunk=chunk, pad=pad)
    assert_same_tokens(layer, rows)
    assert all(len(ents) == cfg.budget for per_head in rows for ents in per_head)


# --- snapkv ---------------------------------------------------------------------------------


def test_snapkv_single_chunk_is_topk_of_pooled_window_votes() -> None:
    """One prefill of the whole prompt: the window plus the top (budget - window) pooled votes."""
    cfg = SnapKV(budget=10, obs_window=4, pool_kernel=3)
    t = 24
    q, k, v, valid = stream(1, t, seed=3)
    layer = cfg.make_layer(0, SPEC)
    assert isinstance(layer, EvictingLayer)
    layer.attend(q, k, v, valid, SCALE)
    logits = torch.einsum("bhtd,bhnd->bhtn", q.view(1, HKV, G * t, D), k).view(1, HKV, G, t, t) * SCALE
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    votes = torch.softmax(logits, dim=-1)[0, :, :, -4:, :-4].sum(dim=(1, 2))  # (Hkv, t - 4): prefix only
    padded = torch.nn.functional.pad(votes, (1, 1))
    pooled = (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3  # (Hkv, t - 4)
    for h in range(HKV):
        expect = set(pooled[h].topk(10 - 4).indices.tolist()) | set(range(t - 4, t))
        assert set(resident(layer, 0, h)) == expect


@pytest.mark.parametrize(("batch", "pad", "chunk", "kernel"), [(1, 0, 8, 7), (2, 5, 6, 3), (1, 0, 3, 5)])
def test_snapkv_chunked_prefill_and_decode(batch: int, pad: int, chunk: int, kernel: int) -> None:
    cfg = SnapKV(budget=12, obs_window=4, pool_kernel=kernel)
    layer, rows = run_both(cfg, snapkv_rule(cfg), batch, length=36, prefill=30, chunk=chunk, pad=pad)
    assert_same_tokens(layer, rows)


# --- cca ------------------------------------------------------------------------------------


def test_cca_core_is_importance_weighted_mean_and_biased_in_attention() -> None:
    """8 tokens with local=4, group_size=4: tokens 0..3 become one core; then one decode query."""
    cfg = CCA(group_size=4, local=4)
    q, k, v, valid = stream(1, 9, seed=7)
    layer = cfg.make_layer(0, SPEC)
    assert isinstance(layer, EvictingLayer)
    layer.attend(q[:, :, :8], k[:, :, :8], v[:, :, :8], valid[:, :8], SCALE)
    assert layer.stats().tokens_resident == 1 + 4
    assert layer.store is not None
    expect = torch.empty(HQ, D)
    for h in range(HKV):
        qh = q[0, h * G : (h + 1) * G, :8]  # (G, 8, D)
        logits = (qh @ k[0, h, :8].T) * SCALE  # (G, 8, 8)
        logits = logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), -math.inf)
        imp = torch.softmax(logits, dim=-1).sum(dim=(0, 1))[:4]  # attention received by tokens 0..3
        w = imp / imp.sum()
        core_k, core_v = w @ k[0, h, :4], w @ v[0, h, :4]
        got = resident(layer, 0, h)
        assert set(got) == {3, 4, 5, 6, 7}  # the core carries its newest member's position
        torch.testing.assert_close(layer.store["k"][0, h, got[3]], core_k)
        torch.testing.assert_close(layer.store["v"][0, h, got[3]], core_v)
        # the decode query sees the core with logit bias log(4), tokens 4..7 and itself
        keys = torch.cat([core_k[None], k[0, h, 4:9]])  # (6, D)
        vals = torch.cat([core_v[None], v[0, h, 4:9]])
        bias = torch.tensor([math.log(4.0)] + [0.0] * 5)
        expect[h * G : (h + 1) * G] = torch.softmax(q[0, h * G : (h + 1) * G, 8] @ keys.T * SCALE + bias, -1) @ vals
    out = layer.attend(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], valid[:, 8:], SCALE)  # (1, 1, Hq, D)
    torch.testing.assert_close(out[0, 0], expect)


@pytest.mark.parametrize(("batch", "pad", "chunk", "local"), [(1, 0, 5, 6), (2, 5, 6, 4), (1, 0, 30, 0)])
def test_cca_matches_reference(batch: int, pad: int, chunk: int, local: int) -> None:
    cfg = CCA(group_size=3, local=local)
    layer, rows = run_both(cfg, cca_rule(cfg), batch, length=36, prefill=30, chunk=chunk, pad=pad)
    assert_same_tokens(layer, rows)
    assert layer.store is not None
    for b, per_head in enumerate(rows):
        for h, ents in enumerate(per_head):
            got = resident(layer, b, h)
            for e in ents:
                assert float(layer.store["count"][b, h, got[e["pos"]]]) == e["count"]


@pytest.mark.parametrize("chunk", [1, 4, 7, 40])
def test_cca_resident_tokens_follow_analytic_count(chunk: int) -> None:
    cfg = CCA(group_size=4, local=6)
    q, k, v, valid = stream(1, 40, seed=2)
    layer = cfg.make_layer(0, SPEC)
    assert isinstance(layer, EvictingLayer)
    seen = 0
    for sl in chunks(40, 40, chunk):
        layer.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], valid[:, sl], SCALE)
        seen += sl.stop - sl.start
        assert layer.stats().tokens_resident == cfg.analytic_tokens(seen)
    assert cfg.analytic_tokens(40) == 6 + 34 // 4 + 34 % 4


# --- bounded memory and padding ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_peak_memory_follows_budget_not_prompt(policy: str, llama: torch.nn.Module) -> None:
    params = {"budget": 24, "obs_window": 4} if policy == "snapkv" else {"budget": 24, "recent": 8}
    chunk = 16
    peaks = []
    for length in (80, 160):
        ids, _ = prompts(1, length, seed=length)
        res = kv.generate(llama, ids, policy, max_new_tokens=3, prefill_chunk=chunk, **params)
        spec = res.cache.spec
        layers, tb = spec.num_layers, spec.token_bytes
        assert res.stats.bytes_allocated == layers * (24 + chunk) * tb  # buffers: budget + one chunk
        # peak: one layer holds budget + its chunk in flight while the others hold the budget
        assert res.stats.peak_bytes == (layers * 24 + chunk) * tb
        assert res.stats.bytes_resident == layers * 24 * tb
        peaks.append(res.stats.peak_bytes)
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize("cfg", [SnapKV(budget=10, obs_window=3, pool_kernel=3), H2O(budget=10, recent=3),
                                 CCA(group_size=3, local=5)], ids=["snapkv", "h2o", "cca"])
def test_padded_row_equals_the_row_alone(cfg: PolicyConfig) -> None:
    q, k, v, valid = stream(2, 30, pad=6, seed=11)
    batched, alone = cfg.make_layer(0, SPEC), cfg.make_layer(0, SPEC)
    assert isinstance(batched, EvictingLayer) and isinstance(alone, EvictingLayer)
    for sl in chunks(30, 24, 8):
        out_b = batched.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], valid[:, sl], SCALE)
        real = valid[1, sl]
        if not bool(real.any()):
            continue
        s1 = slice(sl.start + int((~real).sum()), sl.stop)
        out_a = alone.attend(q[1:, :, s1], k[1:, :, s1], v[1:, :, s1], valid[1:, s1], SCALE)
        torch.testing.assert_close(out_b[1, real], out_a[0], atol=1e-5, rtol=1e-5)
    for h in range(HKV):
        assert set(resident(batched, 1, h)) == set(resident(alone, 0, h))


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "params", "message"),
    [
        ("snapkv", {"budget": 0}, "budget must be an integer >= 1"),
        ("snapkv", {"budget": 8, "obs_window": 9}, "obs_window must be <= budget"),
        ("snapkv", {"obs_window": 0}, "obs_window must be an integer >= 1"),
        ("snapkv", {"pool_kernel": 4}, "pool_kernel must be odd"),
        ("snapkv", {"pool_kernel": 0}, "pool_kernel must be an integer >= 1"),
        ("h2o", {"budget": 0}, "budget must be an integer >= 1"),
        ("h2o", {"budget": 8, "recent": 9}, "recent must be <= budget"),
        ("h2o", {"recent": -1}, "recent must be an integer >= 0"),
        ("h2o", {"budget": 2.5}, "budget must be an integer"),
        ("cca", {"group_size": 1}, "group_size must be an integer >= 2"),
        ("cca", {"local": -1}, "local must be an integer >= 0"),
        ("cca", {"local": True}, "local must be an integer"),
        ("cca", {"window": 3}, "allowed parameters: group_size, local"),
    ],
)
def test_bad_parameters_are_rejected(policy: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        kv.resolve(policy, **params)


def test_a_decode_tokens_compiled_append_equals_the_general_one() -> None:
    """``TokenStore.append_token`` (one compiled call per decode step) against ``append`` with the
    positions ``advance_positions`` gives: every field, the real-token counts, the padding flag -
    with a padding row among the real ones and an extra field (h2o's scores) refilled."""
    from memfusion.kv.policy import TokenStore, advance_positions

    spec = ModelSpec("LlamaForCausalLM", 1, 4, 2, 8, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    stores = [TokenStore(3, spec), TokenStore(3, spec)]
    seen = [torch.tensor([4, 0, 7]), torch.tensor([4, 0, 7])]
    for st in stores:
        st.add_field("acc", torch.float32, fill=0.5)
    for step in range(20):  # past the first capacity doubling (16 slots)
        k, v = torch.randn(3, 2, 1, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g)
        valid = torch.tensor([[True], [step % 3 != 1], [True]])
        stores[1].fields["acc"][:, :, : stores[1].n] += 1.0  # a policy's scores, not what append writes
        stores[0].fields["acc"][:, :, : stores[0].n] += 1.0
        assert stores[0].append_token(k, v, valid, seen[0])
        pos, seen[1] = advance_positions(seen[1], valid)
        stores[1].append(k, v, pos, valid)
    assert stores[0].n == stores[1].n == 20
    assert stores[0].padded and stores[1].padded
    assert torch.equal(seen[0], seen[1]) and seen[0].tolist() == [24, 13, 27]
    for name in ("k", "v", "pos", "valid", "acc"):
        assert torch.equal(stores[0][name], stores[1][name]), name
