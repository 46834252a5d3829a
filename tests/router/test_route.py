from __future__ import annotations

import pytest

from memfusion.errors import BudgetExceeded, InvalidInput
from memfusion.router import Request, RetrievalSignal, Router, estimate_task
from memfusion.router.budget import estimate_bytes

TB = 2048  # KV bytes per token of the reference model (4 layers, 2 KV heads of 32, fp32)


def test_dense_when_it_fits_window_sized_to_budget_otherwise() -> None:
    router = Router()
    fits = router.route(Request(2000, TB, task="document", memory_budget_mb=64, layers=4))
    assert (fits.kv_policy, fits.kv_params, fits.retrieve) == ("dense", {}, False)
    tight = router.route(Request(4000, TB, task="document", memory_budget_mb=1, layers=4))
    assert tight.kv_policy in ("quant", "snapkv", "window")
    assert tight.estimated_peak_bytes <= 1024 * 1024
    assert any("does not fit" in r for r in tight.reasons)


def test_budget_that_nothing_meets_names_the_smallest_feasible_one() -> None:
    router = Router()
    req = Request(4000, TB, task="document", memory_budget_mb=0.05, layers=4)
    with pytest.raises(BudgetExceeded, match=r"smallest feasible memory budget is (\d+\.\d+) MB") as info:
        router.route(req)
    need = float(str(info.value).split("memory_budget_mb=")[1].rstrip(")"))
    ok = router.route(Request(4000, TB, task="document", memory_budget_mb=need + 0.001, layers=4))
    assert ok.estimated_peak_bytes <= (need + 0.001) * 1024 * 1024


def test_retrieval_decisions() -> None:
    router = Router()
    req = Request(500, TB, task="chat", layers=4)
    t = router.table.retrieval.min_score
    assert router.route(req, None).retrieve is False
    assert router.route(req, RetrievalSignal(None)).retrieve is False
    assert router.route(req, RetrievalSignal(t + 0.01)).retrieve is True
    assert router.route(req, RetrievalSignal(t - 0.01)).retrieve is False
    in_ctx = router.route(req, RetrievalSignal(0.99, in_context=True))
    assert in_ctx.retrieve is False and any("appears in the context" in r for r in in_ctx.reasons)
    always = router.route(Request(100, TB, task="knowledge", layers=4), RetrievalSignal(t - 0.3))
    assert always.retrieve is True and always.strategy == "dense+store"
    never = Router.from_spec("window").route(req, RetrievalSignal(0.99))
    assert never.retrieve is False and never.kv_policy == "window"
    assert Router.from_spec("window+store").route(req, RetrievalSignal(0.0)).retrieve is True


def test_fixed_strategies_are_sized_too() -> None:
    route = Router.from_spec("window").route(Request(3000, TB, memory_budget_mb=0.5, layers=4))
    assert route.kv_params["window"] + route.kv_params["sinks"] == route.token_budget
    assert estimate_bytes("window", 3000, route.token_budget, TB, 512, layers=4) <= 0.5 * 1024 * 1024
    with pytest.raises(BudgetExceeded):
        Router.from_spec("dense").route(Request(3000, TB, memory_budget_mb=0.5, layers=4))


def test_bad_specs_and_requests() -> None:
    with pytest.raises(InvalidInput, match="unknown router 'fastest'"):
        Router.from_spec("fastest")
    with pytest.raises(InvalidInput, match="unknown router"):
        Router.from_spec("window+cache")
    with pytest.raises(InvalidInput, match="memory_budget_mb"):
        Request(10, TB, memory_budget_mb=-1, layers=4)
    with pytest.raises(InvalidInput, match="task"):
        Request(10, TB, task="poetry", layers=4)


def test_explain_lists_the_reasons() -> None:
    route = Router().route(Request(4000, TB, task="document", memory_budget_mb=1, layers=4), RetrievalSignal(0.9))
    text = route.explain()
    assert text.startswith(f"route: {route.strategy}") and all(r in text for r in route.reasons)
    assert route.to_dict()["inputs"]["best_score"] == 0.9


@pytest.mark.parametrize(
    ("prompt", "n", "task"),
    [
        ("def f(x):\n    return x\nclass A:\n    pass\nimport os\n", 30, "code"),
        ("what is the value of amber falcon?", 12, "knowledge"),
        ("word " * 10 + "\nwhat is it?", 2000, "document"),
        ("hello there, how are you", 8, "chat"),
    ],
)
def test_estimate_task(prompt: str, n: int, task: str) -> None:
    assert estimate_task(prompt, n) == task


def test_store_policy_when_retrieval_pays_under_a_tight_budget() -> None:
    router = Router()
    rule = router.table.match("document", 4000, None)
    assert rule.store_policy == "window" and rule.fallbacks[0] != "window"
    tight = Request(4000, TB, task="document", memory_budget_mb=1, layers=4)
    t = router.table.retrieval.min_score
    without = router.route(tight, RetrievalSignal(t - 0.1))  # retrieval does not pay: the first fallback that fits
    with_store = router.route(tight, RetrievalSignal(t + 0.1))
    assert without.kv_policy != "window" and not without.retrieve
    assert (with_store.kv_policy, with_store.strategy) == ("window", "window+store")
    assert with_store.estimated_peak_bytes <= 1024 * 1024
    assert any("retrieval pays: window keeps the retrieved facts" in r for r in with_store.reasons)
    roomy = router.route(Request(4000, TB, task="document", memory_budget_mb=64, layers=4), RetrievalSignal(t + 0.1))
    assert roomy.strategy == "dense+store"  # the rule's own policy fits: store_policy is not needed
