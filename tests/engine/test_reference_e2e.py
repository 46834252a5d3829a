"""End to end on the shipped reference model: the engine answers from the store what the model
cannot know otherwise, inside a long document that exceeds the KV budget, and follows the store's
versions. The baseline is the same request with retrieval off (same model, same KV budget). The
store is the SQLite one of ``conftest.py``."""

from __future__ import annotations

import random
import time

import pytest

from memfusion.engine import Engine
from memfusion.models.tokenizer import FILLER_ADJECTIVES, FILLER_NOUNS, FILLER_VERBS, format_question

BUDGET_MB = 1.0  # 256 tokens of the reference model's KV (4 layers x 2 KV heads x 64 x K and V x 4 bytes)
FACTS = {"amber falcon": "4721", "icy otter": "9083", "royal lynx": "3156", "calm heron": "6610", "misty koala": "2849"}


def document(tokens: int, seed: int = 0) -> str:
    """Essay-like sentences of the filler words, about ``tokens`` tokens long, no digits."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(tokens // 8):
        a, n, v = rng.choice(FILLER_ADJECTIVES), rng.choice(FILLER_NOUNS), rng.choice(FILLER_VERBS)
        sentences.append(f"the {a} {n} {v} the {rng.choice(FILLER_NOUNS)}.")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def doc(reference_model) -> str:  # type: ignore[no-untyped-def]
    text = document(2000)
    assert len(reference_model[1](text).input_ids) > 4 * BUDGET_MB * 1024 * 1024 / 4096  # 4x what the budget holds
    return text


def test_facts_only_in_the_store_are_answered_within_the_budget(reference_model, store, doc) -> None:  # type: ignore[no-untyped-def]
    model, tok = reference_model
    eng = Engine(model, tok, store=store, memory_budget_mb=BUDGET_MB)
    baseline = Engine(model, tok, store=store, memory_budget_mb=BUDGET_MB)
    for key, value in FACTS.items():
        eng.remember("e2e", f"{key} is {value}")
    right, base_right = 0, 0
    for key, value in FACTS.items():
        prompt = doc + "\n" + format_question(key)
        out = eng.generate(prompt, namespace="e2e", max_new_tokens=8)
        assert out.route.retrieve and out.stats.retrieved[0].record.key == key
        assert out.stats.kv is not None and out.stats.within_budget
        assert out.stats.kv.peak_bytes <= BUDGET_MB * 1024 * 1024 < out.stats.prompt_tokens * eng.token_bytes
        right += out.text.strip() == value
        base = baseline.generate(prompt, namespace=None, max_new_tokens=8)  # no store read
        assert not base.route.retrieve and base.stats.within_budget
        base_right += base.text.strip() == value
    assert right == len(FACTS)
    assert base_right == 0


def test_an_answer_in_the_context_needs_no_retrieval(reference_model, store, doc) -> None:  # type: ignore[no-untyped-def]
    model, tok = reference_model
    eng = Engine(model, tok, store=store)
    eng.remember("ctx", "vivid otter is 1111")  # a stale value the context contradicts
    prompt = doc[:2000] + " <facts>\nvivid otter <v> 5309\n</facts>\n\n" + format_question("vivid otter")
    out = eng.generate(prompt, namespace="ctx", max_new_tokens=8)
    assert not out.route.retrieve and out.stats.retrieved == []
    assert out.text.strip() == "5309"


def test_updates_and_time_travel_change_the_answer(reference_model, store, doc) -> None:  # type: ignore[no-untyped-def]
    model, tok = reference_model
    eng = Engine(model, tok, store=store, memory_budget_mb=BUDGET_MB)
    first = eng.remember("upd", "swift panda is 7305")
    prompt = doc + "\n" + format_question("swift panda")
    assert eng.generate(prompt, namespace="upd", max_new_tokens=8).text.strip() == "7305"
    time.sleep(0.01)
    eng.remember("upd", "swift panda is 2194", expected_version=first.version)
    assert eng.generate(prompt, namespace="upd", max_new_tokens=8).text.strip() == "2194"
    old = eng.generate(prompt, namespace="upd", max_new_tokens=8, as_of=first.committed_at)
    assert old.text.strip() == "7305"
