"""The engine's mechanics on a random model: what it retrieves, where it puts it, the route, the
budget, the namespaces and the monitor. The prompt the model read (``out.prompt``) shows what was
retrieved, independently of the model's answer; answers are tested on the reference model."""

from __future__ import annotations

import time

import pytest

from memfusion.engine import Engine, facts_in_prompt, parse_fact, split_prompt, with_facts
from memfusion.errors import BudgetExceeded, InvalidInput, NotFound
from memfusion.models.tokenizer import format_question
from memfusion.router import load_table

DOC = " ".join(["the old river carries a quiet boat across the valley."] * 30)


def _engine(tiny, store, **kw) -> Engine:
    return Engine(tiny.model, tiny.tokenizer, store=store, **kw)


def test_parse_fact_and_prompt_helpers() -> None:
    assert parse_fact("The vault code is 4721.") == ("vault code", "4721")
    assert parse_fact("amber falcon = 12") == ("amber falcon", "12")
    key, value = parse_fact("hello world")
    assert key.startswith("note ") and value == "hello world"
    assert split_prompt("doc line\nmore doc\nquestion?\n") == ("doc line\nmore doc", "question?")
    assert split_prompt("only a question") == ("", "only a question")
    prompt = with_facts("doc.", [("amber falcon", "4721")], "q <v>")
    assert prompt == "doc. <facts>\namber falcon <v> 4721\n</facts>\n\nq <v>"
    assert facts_in_prompt(prompt) == [("amber falcon", "4721")]
    with pytest.raises(InvalidInput):
        split_prompt("   ")


def test_remember_versions_a_key(tiny, store) -> None:
    eng = _engine(tiny, store)
    r1 = eng.remember("versions", "amber falcon is 4721")
    r2 = eng.remember("versions", "amber falcon is 9034", expected_version=r1.version)
    assert (r1.key, r1.version, r2.version) == ("amber falcon", 1, 2)
    assert r2.metadata["fact_value"] == "9034"
    assert eng.remember("versions", "5555", key="Icy  Otter").metadata == {
        "fact_key": "icy otter",
        "fact_value": "5555",
    }


def test_retrieved_facts_go_right_before_the_question(tiny, store) -> None:
    eng = _engine(tiny, store)
    eng.remember("alice", "amber falcon is 4721")
    eng.remember("alice", "icy otter is 1093")
    question = format_question("amber falcon")
    out = eng.generate(DOC + "\n" + question, namespace="alice", max_new_tokens=3)
    assert out.route.retrieve and out.route.strategy.endswith("+store")
    assert out.prompt.endswith("amber falcon <v> 4721\n" + out.prompt.split("amber falcon <v> 4721\n", 1)[1])
    assert out.prompt.index("amber falcon <v> 4721") > out.prompt.index(DOC[-40:])
    assert out.prompt.endswith("</facts>\n\n" + question)
    assert out.stats.retrieved[0].record.key == "amber falcon"
    assert out.stats.best_score is not None and out.stats.best_score >= eng.router.table.retrieval.min_score
    assert out.stats.latency["retrieval"] > 0 and out.stats.latency["total"] >= out.stats.latency["prefill"]
    assert len(out.tokens) <= 3


def test_only_facts_within_the_margin_of_the_best_hit_go_in(tiny, store) -> None:
    eng_all = _engine(tiny, store, router=load_table().with_retrieval(min_score=-1.0, margin=2.0))
    eng_all.remember("dave", "amber falcon is 4721")
    eng_all.remember("dave", "icy otter is 1093")
    question = format_question("amber falcon")
    wide = eng_all.generate(DOC + "\n" + question, namespace="dave", max_new_tokens=1)
    assert {h.record.key for h in wide.stats.retrieved} == {"amber falcon", "icy otter"}
    assert "icy otter <v> 1093" in wide.prompt
    eng_one = _engine(tiny, store, router=load_table().with_retrieval(min_score=-1.0, margin=0.0))
    one = eng_one.generate(DOC + "\n" + question, namespace="dave", max_new_tokens=1)
    assert [h.record.key for h in one.stats.retrieved] == ["amber falcon"] and "icy otter" not in one.prompt


def test_no_retrieval_when_the_context_answers_or_nothing_matches(tiny, store) -> None:
    eng = _engine(tiny, store)
    eng.remember("bob", "amber falcon is 4721")
    question = format_question("amber falcon")
    in_context = eng.generate("the amber falcon value is 17.\n" + question, namespace="bob", max_new_tokens=2)
    assert not in_context.route.retrieve and "<facts>" not in in_context.prompt
    assert any("appears in the context" in r for r in in_context.route.reasons)
    unrelated = eng.generate(DOC + "\nhow many boats cross the quiet valley?", namespace="bob", max_new_tokens=2)
    assert not unrelated.route.retrieve and "<facts>" not in unrelated.prompt


def test_as_of_reads_the_older_version(tiny, store) -> None:
    eng = _engine(tiny, store)
    r1 = eng.remember("carol", "vivid otter is 1111")
    time.sleep(0.01)
    eng.remember("carol", "vivid otter is 2222")
    question = DOC + "\n" + format_question("vivid otter")
    assert "vivid otter <v> 2222" in eng.generate(question, namespace="carol", max_new_tokens=1).prompt
    old = eng.generate(question, namespace="carol", max_new_tokens=1, as_of=r1.committed_at)
    assert "vivid otter <v> 1111" in old.prompt and "2222" not in old.prompt


def test_namespaces_are_isolated(tiny, store) -> None:
    eng = _engine(tiny, store)
    eng.remember("tenant-a", "royal lynx is 3141")
    eng.remember("tenant-b", "royal lynx is 2718")
    question = DOC + "\n" + format_question("royal lynx")
    a = eng.generate(question, namespace="tenant-a", max_new_tokens=1).prompt
    b = eng.generate(question, namespace="tenant-b", max_new_tokens=1).prompt
    assert "3141" in a and "2718" not in a
    assert "2718" in b and "3141" not in b


def test_memory_budget_holds_or_names_the_smallest_feasible(tiny, store) -> None:
    eng = _engine(tiny, store, memory_budget_mb=0.05, prefill_chunk=64)
    eng.remember("dave", "calm heron is 8080")
    prompt = DOC + "\n" + format_question("calm heron")
    out = eng.generate(prompt, namespace="dave", max_new_tokens=2)
    assert out.route.kv_policy in ("quant", "window", "snapkv")
    assert out.stats.kv is not None and out.stats.kv.peak_bytes <= 0.05 * 1024 * 1024
    assert out.stats.within_budget
    with pytest.raises(BudgetExceeded, match="smallest feasible memory budget is"):
        _engine(tiny, store, memory_budget_mb=0.001).generate(prompt, namespace="dave", max_new_tokens=2)


def test_bad_input(tiny, store) -> None:
    eng = _engine(tiny, store)
    with pytest.raises(NotFound, match="unknown namespace 'nobody'"):
        eng.generate("hi\nwhat?", namespace="nobody")
    with pytest.raises(InvalidInput, match="non-empty"):
        eng.generate("  ", namespace=None)
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        eng.generate("hi", max_new_tokens=0)
    with pytest.raises(InvalidInput, match="no store"):
        Engine(tiny.model, tiny.tokenizer).generate("hi\nwhat?", namespace="x")
    with pytest.raises(InvalidInput, match="beyond the model's limit"):
        eng.generate("word " * (tiny.max_positions + 10), max_new_tokens=1)
    with pytest.raises(InvalidInput, match="unknown router"):
        Engine(tiny.model, tiny.tokenizer, router="fastest")
    with pytest.raises(InvalidInput, match="memory_budget_mb"):
        Engine(tiny.model, tiny.tokenizer, memory_budget_mb=-3)


def test_write_back_stores_new_facts_only(tiny, store) -> None:
    eng = _engine(tiny, store, write_back=True)
    eng.remember("erin", "sly newt is 1")
    prompt = "<facts>\nsly newt <v> 1\nbold crane <v> 77\n</facts>\nwhat now?"
    out = eng.generate(prompt, namespace="erin", max_new_tokens=1)
    assert [r.key for r in out.stats.written] == ["bold crane"]
    assert store.get("erin", "bold crane").metadata["fact_value"] == "77"
    again = eng.generate(prompt, namespace="erin", max_new_tokens=1)
    assert again.stats.written == []


def test_monitor_counts_requests_and_routes(tiny, store) -> None:
    eng = _engine(tiny, store)
    eng.remember("frank", "tiny yak is 4")
    eng.generate(DOC + "\n" + format_question("tiny yak"), namespace="frank", max_new_tokens=2)
    with pytest.raises(NotFound):
        eng.generate("x\ny", namespace="nobody-here")
    snap = eng.monitor.snapshot()
    ok = [v for k, v in snap.items() if k.startswith("memfusion_requests_total") and 'status="ok"' in k]
    err = [v for k, v in snap.items() if k.startswith("memfusion_requests_total") and 'status="error"' in k]
    assert ok == [1.0] and err == [1.0]
    assert any('route="' in k and "+store" in k for k in snap if k.startswith("memfusion_route_total"))
    assert b"memfusion_prefill_seconds" in eng.monitor.exposition()
