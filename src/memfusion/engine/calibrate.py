"""``memfusion route calibrate``: fit the retrieval threshold on a generated validation set.

The set, seeded: ``n_facts`` facts ``"<adjective noun> is <number>"`` remembered in a fresh
namespace of the given store (the engine's own :meth:`~memfusion.Engine.remember` format), then
``n_questions`` questions in the fact-lookup format (:func:`memfusion.models.tokenizer.format_question`),
half about stored keys (the best hit should be used) and half about keys that were never stored
(the best hit is another fact: retrieval must not pay). Each question's best-hit similarity and its
label go to :func:`memfusion.router.fit_threshold`; the questions about stored keys, with the gaps of
their top ``k`` hits to the best one, go to :func:`memfusion.router.fit_margin`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from memfusion.engine.prompt import parse_fact
from memfusion.errors import InvalidInput
from memfusion.models.tokenizer import KEY_ADJECTIVES, KEY_NOUNS, format_question
from memfusion.router import Calibration, MarginCalibration, fit_margin, fit_threshold
from memfusion.store.base import Store


@dataclass(frozen=True)
class ValidationSet:
    scores: tuple[float, ...]
    labels: tuple[bool, ...]
    gaps: tuple[tuple[float, ...], ...] = ()  # per question about a stored key: its top hits' best - score
    answer: tuple[int | None, ...] = ()  # ... and the index of the hit holding its fact (None: not retrieved)


def validation_set(
    store: Store, namespace: str, n_facts: int = 100, n_questions: int = 200, seed: int = 0, k: int = 4
) -> ValidationSet:
    """Remember ``n_facts`` facts in ``namespace`` and score ``n_questions`` questions (see above)."""
    if n_facts < 1 or n_questions < 2:
        raise InvalidInput("calibration needs n_facts >= 1 and n_questions >= 2")
    rng = random.Random(f"calibrate/{seed}")
    keys = [f"{a} {b}" for a in KEY_ADJECTIVES for b in KEY_NOUNS]
    rng.shuffle(keys)
    stored, unseen = keys[:n_facts], keys[n_facts:]
    items = []
    for key in stored:
        text = f"{key} is {rng.randrange(1000, 10000)}"
        fact_key, value = parse_fact(text)
        items.append({"key": fact_key, "text": text, "metadata": {"fact_key": fact_key, "fact_value": value}})
    store.put_many(namespace, items, actor="calibrate")
    scores: list[float] = []
    labels: list[bool] = []
    gaps: list[tuple[float, ...]] = []
    answer: list[int | None] = []
    for i in range(n_questions):
        positive = i % 2 == 0
        key = rng.choice(stored) if positive else rng.choice(unseen)
        hits = store.search(namespace, format_question(key), k=k)
        if not hits:
            continue
        scores.append(hits[0].score)
        labels.append(positive and hits[0].record.key == key)
        if positive:
            gaps.append(tuple(max(0.0, hits[0].score - h.score) for h in hits))
            answer.append(next((j for j, h in enumerate(hits) if h.record.key == key), None))
    return ValidationSet(tuple(scores), tuple(labels), tuple(gaps), tuple(answer))


def calibrate(
    store: Store, namespace: str = "calibration", n_facts: int = 100, n_questions: int = 200, seed: int = 0, k: int = 4
) -> tuple[Calibration, MarginCalibration]:
    """The fitted threshold and margin on the generated set (see the module docstring)."""
    data = validation_set(store, namespace, n_facts, n_questions, seed, k)
    return fit_threshold(data.scores, data.labels), fit_margin(data.gaps, data.answer)
