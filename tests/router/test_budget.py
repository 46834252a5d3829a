"""The memory model of the router against the KV stats that real runs report."""

from __future__ import annotations

import pytest
import torch

from memfusion.bench.runner import random_model
from memfusion.kv import generate
from memfusion.kv.spec import ModelSpec
from memfusion.router.budget import (
    BOUNDED,
    MIN_BUDGET,
    estimate_bytes,
    policy_params,
    size_policy,
    smallest_feasible_bytes,
)

N, CHUNK, NEW = 300, 64, 4


@pytest.fixture(scope="module")
def tiny():
    return random_model(seed=0)


@pytest.mark.parametrize("policy", ["dense", "paged", "quest", "window", "snapkv", "h2o", "tiered", "quant", "cca"])
@pytest.mark.parametrize("budget", [64, 128])
def test_estimate_bounds_the_measured_peak(tiny, policy: str, budget: int) -> None:
    spec = ModelSpec.from_model(tiny.model)
    tbytes = spec.num_layers * spec.token_bytes
    ids = torch.randint(10, 1000, (1, N), generator=torch.Generator().manual_seed(1))
    res = generate(tiny.model, ids, policy, max_new_tokens=NEW, prefill_chunk=CHUNK, **policy_params(policy, budget))
    estimate = estimate_bytes(policy, N + NEW, budget, tbytes, CHUNK, spec.elem_bytes, spec.num_layers)
    assert res.stats.peak_bytes <= estimate, (policy, res.stats.peak_bytes, estimate)
    # and the model is not uselessly loose
    assert estimate <= 1.5 * res.stats.peak_bytes, (policy, res.stats.peak_bytes, estimate)


def _brute_force(policy: str, n: int, memory: int, tbytes: int, chunk: int) -> int | None:
    fits = [b for b in range(MIN_BUDGET, n + 1) if estimate_bytes(policy, n, b, tbytes, chunk) <= memory]
    return max(fits) if fits else None


@pytest.mark.parametrize("policy", BOUNDED)
@pytest.mark.parametrize("memory", [150_000, 400_000, 1_000_000, 10_000_000])
def test_size_policy_is_the_largest_budget_that_fits(policy: str, memory: int) -> None:
    n, tbytes, chunk = 900, 1024, 32
    sizing = size_policy(policy, n, memory, tbytes, chunk)
    if estimate_bytes(policy, n, n, tbytes, chunk) <= memory:
        assert sizing is not None and sizing.budget == n
        return
    expected = _brute_force(policy, n, memory, tbytes, chunk)
    assert (sizing.budget if sizing else None) == expected
    if sizing is not None:
        assert sizing.peak_bytes <= memory


def test_unbounded_policies_fit_or_not_at_all() -> None:
    assert size_policy("dense", 1000, 1000 * 100 + 64 * 100, 100, 64) is not None
    assert size_policy("dense", 1000, 1000 * 100, 100, 64) is None  # the chunk in flight does not fit
    assert size_policy("dense", 1000, None, 100, 64).budget == 1000  # type: ignore[union-attr]


def test_smallest_feasible_is_feasible_and_tight() -> None:
    n, tbytes, chunk = 5000, 2048, 128
    need = smallest_feasible_bytes(("dense", "window"), n, tbytes, chunk)
    assert size_policy("window", n, need, tbytes, chunk) is not None
    assert size_policy("window", n, need - 1, tbytes, chunk) is None
    assert need == (MIN_BUDGET + chunk) * tbytes  # hand-computed: window at 64 tokens + one chunk (1 layer)
    assert smallest_feasible_bytes(("window",), n, tbytes, chunk, layers=4) == MIN_BUDGET * tbytes + chunk * tbytes // 4
