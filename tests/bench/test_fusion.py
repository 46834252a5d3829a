"""The fusion suite: the Pareto front against brute force, the scenarios' invariants, and a quick run
on the tiny random Llama (one row per cell, resume, Ctrl-C, measured KV budgets, the report)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfusion.bench import fusion, fusionsummary
from memfusion.bench.fusion import FusionConfig
from memfusion.bench.fusionsummary import pareto_front
from memfusion.engine.prompt import parse_fact
from memfusion.errors import InvalidInput, NotFound
from memfusion.models.tokenizer import build_tokenizer

# The random model: 2 layers x 2 KV heads x head_dim 16 x (K and V) x 4 bytes = 512 bytes per token.
BYTES_PER_TOKEN = 2 * 2 * 16 * 2 * 4
BUDGET_MB = 0.2  # binds at 512 tokens on the random model: dense holds ~0.25 MB there
MB = 1024 * 1024


# --- Pareto front -----------------------------------------------------------------------------


def _brute_front(points: list[tuple[str, float, float]]) -> set[str]:
    """O(n^2): a point is out when another has >= accuracy and <= memory, one of them strictly."""
    out = set()
    for name, acc, mem in points:
        dominated = any((a >= acc and m <= mem and (a > acc or m < mem)) for other, a, m in points if other != name)
        if not dominated:
            out.add(name)
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.integers(0, 6).map(float)),
        max_size=12,
    )
)
def test_pareto_front_matches_brute_force(raw: list[tuple[float, float]]) -> None:
    points = [(f"r{i}", acc, mem) for i, (acc, mem) in enumerate(raw)]  # coarse grids: many ties
    assert pareto_front(points) == _brute_front(points)


def test_pareto_front_hand_cases() -> None:
    assert pareto_front([]) == set()
    assert pareto_front([("a", 0.5, 1.0)]) == {"a"}
    # equal points do not dominate each other
    assert pareto_front([("a", 0.5, 1.0), ("b", 0.5, 1.0)]) == {"a", "b"}
    # same accuracy, less memory wins; same memory, more accuracy wins
    assert pareto_front([("a", 0.5, 1.0), ("b", 0.5, 2.0)]) == {"a"}
    assert pareto_front([("a", 0.5, 1.0), ("b", 0.75, 1.0)]) == {"b"}
    # a trade-off keeps both; a point worse on both sides goes
    assert pareto_front([("cheap", 0.2, 0.1), ("good", 0.9, 3.0), ("bad", 0.1, 4.0)]) == {"cheap", "good"}
    # the same accuracy at more memory is dominated even when a third point sits between
    assert pareto_front([("a", 1.0, 2.0), ("b", 0.5, 1.0), ("c", 1.0, 3.0)]) == {"a", "b"}
    with pytest.raises(InvalidInput, match="distinct names"):
        pareto_front([("a", 0.5, 1.0), ("a", 0.6, 2.0)])
    with pytest.raises(InvalidInput, match="finite"):
        pareto_front([("a", float("nan"), 1.0)])


# --- configuration ----------------------------------------------------------------------------


def test_config_refuses_bad_input_clearly(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"route 'windw' is not valid.*auto.*window"):
        FusionConfig(routes=("auto", "windw"), out=tmp_path)
    with pytest.raises(InvalidInput, match=r"route 'dense\+cache'"):
        FusionConfig(routes=("dense+cache",), out=tmp_path)
    with pytest.raises(InvalidInput, match=r"route 'missing\.toml'"):
        FusionConfig(routes=("missing.toml",), out=tmp_path)
    with pytest.raises(InvalidInput, match="distinct"):
        FusionConfig(routes=("auto", "auto"), out=tmp_path)
    with pytest.raises(InvalidInput, match="at least one route"):
        FusionConfig(routes=(), out=tmp_path)
    with pytest.raises(InvalidInput, match="memory_budget_mb"):
        FusionConfig(memory_budget_mb=0, out=tmp_path)
    with pytest.raises(InvalidInput, match="lengths"):
        FusionConfig(lengths=(), out=tmp_path)
    with pytest.raises(InvalidInput, match="samples"):
        FusionConfig(samples=0, out=tmp_path)
    with pytest.raises(InvalidInput, match="n_facts"):
        FusionConfig(n_facts=0, out=tmp_path)
    q = FusionConfig.quick(out=tmp_path)
    assert (q.lengths, q.samples, q.routes) == ((256, 512), 2, ("auto", "dense", "window+store"))
    # unbounded fixed policies cannot be sized to a budget: they run without one
    assert {r: q.budget_for(r) for r in ("auto", "dense", "dense+store", "quest", "window", "window+store")} == {
        "auto": 0.75,
        "dense": None,
        "dense+store": None,
        "quest": None,
        "window": 0.75,
        "window+store": 0.75,
    }


# --- scenarios --------------------------------------------------------------------------------


def _whole(needle: str, text: str) -> bool:
    return re.search(r"(?<![a-z0-9])" + re.escape(needle) + r"(?![a-z0-9])", " ".join(text.split())) is not None


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def test_scenarios_are_deterministic_and_keep_their_invariants(tokenizer: Any, tmp_path: Path) -> None:
    cfg = FusionConfig.quick(out=tmp_path, n_facts=12)
    first = fusion.scenarios(cfg, tokenizer)
    assert first == fusion.scenarios(cfg, tokenizer)
    other = fusion.scenarios(FusionConfig.quick(out=tmp_path, n_facts=12, seed=1), tokenizer)
    assert [s.facts for s in other] != [s.facts for s in first]
    assert sorted(s.key for s in first) == sorted(
        (n, kind, i) for n in cfg.lengths for kind in fusion.KINDS for i in range(cfg.samples)
    )
    assert len({s.namespace for s in first}) == len(first)
    for s in first:
        facts = dict(s.facts)
        assert len(facts) == cfg.n_facts and len(set(facts.values())) == cfg.n_facts
        assert all(re.fullmatch(r"[1-9]\d{3}", v) for v in facts.values())
        assert [parse_fact(t) for t in s.fact_texts] == list(s.facts)  # what Engine.remember would store
        assert s.prompt == s.document + "\n" + s.question and "\n" not in s.question
        if s.kind == "store":
            assert facts[s.asked_key] == s.answer
            assert not _whole(s.answer, s.document) and not _whole(s.asked_key, s.document)
        else:
            assert s.asked_key not in facts and _whole(s.answer, s.document) and s.asked_key in s.question
            assert s.answer not in facts.values()
        n = len(tokenizer(s.prompt)["input_ids"])
        q = len(tokenizer(s.question, add_special_tokens=False)["input_ids"])
        assert abs(n - s.length) <= 0.05 * s.length + q, (s.key, n)
    # both kinds of sample i share the NIAH document
    by_key = {s.key: s for s in first}
    assert by_key[(256, "store", 1)].document == by_key[(256, "context", 1)].document


# --- a quick run on the random model ----------------------------------------------------------


class _Stop:
    """A progress callback that presses Ctrl-C before cell ``at``."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, label: str, done: int, total: int) -> None:
        self.calls.append((label, done, total))
        if self.at is not None and done == self.at and "|" in label:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fusion")
    cfg = FusionConfig.quick(model="random", out=out, memory_budget_mb=BUDGET_MB, n_facts=8, max_new_tokens=4)
    stop = _Stop(at=5)
    first = fusion.run(cfg, step=stop, report=False)
    lines_after_stop = (out / fusion.RESULTS_FILE).read_text().splitlines()
    full = _Stop()
    second = fusion.run(cfg, step=full)
    lines = (out / fusion.RESULTS_FILE).read_text().splitlines()
    third = fusion.run(cfg, report=False)
    return {
        "cfg": cfg,
        "first": first,
        "stopped_lines": lines_after_stop,
        "second": second,
        "steps": full.calls,
        "lines": lines,
        "lines_after_third": (out / fusion.RESULTS_FILE).read_text().splitlines(),
        "third": third,
    }


def _rows(quick: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in quick["lines"][1:]]


def test_every_cell_has_one_row_and_ctrl_c_then_resume_completes(quick: dict[str, Any]) -> None:
    cfg = quick["cfg"]
    total = len(cfg.lengths) * len(cfg.routes) * 2 * cfg.samples
    first, second, third = quick["first"], quick["second"], quick["third"]
    assert (first.interrupted, first.ran) == (True, 5)
    header = json.loads(quick["stopped_lines"][0])
    assert header["type"] == "header" and header["model"] == "random" and header["model_random"] is True
    assert len(quick["stopped_lines"]) == 1 + 5 and all(json.loads(x) for x in quick["stopped_lines"])
    assert (second.interrupted, second.ran, second.skipped, second.failed) == (False, total - 5, 5, 0)
    rows = _rows(quick)
    keys = [fusion.row_key(r) for r in rows]
    want = {(n, route, kind, i) for n in cfg.lengths for route in cfg.routes for kind in fusion.KINDS for i in range(2)}
    assert len(keys) == len(set(keys)) == total and set(keys) == want
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    # re-running adds no rows
    assert (third.ran, third.skipped) == (0, total) and quick["lines_after_third"] == quick["lines"]
    # the progress callback saw every cell, in order, then the end
    counts = [done for _, done, _ in quick["steps"]]
    assert counts == sorted(counts) and quick["steps"][-1][1:] == (total, total)
    assert all(t == total for _, _, t in quick["steps"])


def test_memory_budget_holds_for_auto_and_bounded_routes_measured(quick: dict[str, Any]) -> None:
    rows = _rows(quick)
    for r in rows:
        if r["route"] in ("auto", "window+store"):
            assert r["budget_mb"] == BUDGET_MB and r["within_budget"]
            assert r["kv_peak_bytes"] <= BUDGET_MB * MB, r
        else:
            assert r["route"] == "dense" and r["budget_mb"] is None and r["kv_policy"] == "dense"
            # dense keeps every token: prompt plus one per decode step (an independent count)
            assert r["kv_resident_bytes"] == (r["prompt_tokens"] + r["decode_steps"]) * BYTES_PER_TOKEN
    by = {fusion.row_key(r): r for r in rows}
    for kind in fusion.KINDS:
        for i in range(2):
            dense, window = by[(512, "dense", kind, i)], by[(512, "window+store", kind, i)]
            assert dense["kv_peak_bytes"] > BUDGET_MB * MB > window["kv_peak_bytes"]
            assert window["kv_policy"] == "window" and window["retrieved"]  # "+store" always retrieves
            assert not dense["retrieved"]


def test_store_holds_the_store_answers_only(quick: dict[str, Any]) -> None:
    import memfusion

    cfg = quick["cfg"]
    store = memfusion.open_store(f"sqlite:///{cfg.out / fusion.STORE_FILE}")
    try:
        for s in fusion.scenarios(cfg, build_tokenizer()):
            if s.kind == "store":
                assert store.get(s.namespace, s.asked_key).metadata["fact_value"] == s.answer
            else:
                with pytest.raises(NotFound):
                    store.get(s.namespace, s.asked_key)
    finally:
        store.close()


def test_summary_matches_the_rows(quick: dict[str, Any]) -> None:
    rows = _rows(quick)
    summaries = fusionsummary.summarize(rows)
    assert [(s.length, s.route) for s in summaries] == [
        (n, route) for n in (256, 512, None) for route in ("auto", "dense", "window+store")
    ]
    for s in summaries:
        group = [r for r in rows if r["route"] == s.route and (s.length is None or r["length"] == s.length)]
        assert s.n == len(group) and s.errors == 0 and s.accuracy is not None
        assert s.accuracy.value == pytest.approx(np.mean([r["correct"] for r in group]))
        assert s.accuracy.low <= s.accuracy.value <= s.accuracy.high
        for kind in fusion.KINDS:
            assert s.by_kind[kind].value == pytest.approx(np.mean([r["correct"] for r in group if r["kind"] == kind]))
        assert s.kv_peak_mb == pytest.approx(np.median([r["kv_peak_bytes"] / MB for r in group]))
        assert s.total_ms == pytest.approx(np.median([1e3 * r["total_s"] for r in group]))
        assert s.retrieval_rate == pytest.approx(np.mean([r["retrieved"] for r in group]))
    on = fusionsummary.auto_on_front(summaries)
    assert set(on) == {256, 512}
    for n, flag in on.items():
        points = [(s.route, s.accuracy.value, s.kv_peak_mb) for s in summaries if s.length == n and s.accuracy]
        assert flag == ("auto" in _brute_front(points))  # type: ignore[arg-type]


def test_report_has_one_table_per_length_and_embedded_plots(quick: dict[str, Any]) -> None:
    paths = quick["second"].report
    assert {"md", "html", "pareto_256", "pareto_512", "latency_vs_length", "kv_vs_length"} <= set(paths)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    md = paths["md"].read_text()
    assert md.count("| route |") == 3  # 256, 512, all lengths
    assert "## 256 tokens" in md and "## 512 tokens" in md and "## all lengths" in md
    assert len(re.findall(r"auto is (ON|NOT on) the Pareto front", md)) == 2
    assert "RANDOM WEIGHTS" in md and "no budget for the unbounded fixed routes dense" in md
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and "src='http" not in page


def test_resume_refuses_other_settings(quick: dict[str, Any]) -> None:
    cfg = quick["cfg"]
    other = FusionConfig.quick(model="random", out=cfg.out, memory_budget_mb=0.5, n_facts=8, max_new_tokens=4)
    with pytest.raises(InvalidInput, match="memory_budget_mb"):
        fusion.run(other, report=False)
