"""Seeded, deterministic task generators: long-context (RULER-style), algorithmic (NTM / DNC),
few-shot (MANN), knowledge tracing (DKVMN) and retrieval. One module per family.

The long-context tasks are registered here by name (only they are imported: the other families
load when their module is imported)::

    samples = TASKS["niah_single"].generate(tokenizer, length=4096, n=10, seed=0)
    score = TASKS["niah_single"].score(samples[0], generated_text)
"""

from __future__ import annotations

from memfusion.bench.tasks.longcontext import LongContextTask, Sample
from memfusion.bench.tasks.ruler import (
    CommonWords,
    FactsInText,
    FrequentWords,
    KvLookup,
    NiahMultikey,
    NiahMultiquery,
    NiahMultivalue,
    NiahSingle,
    Passkey,
    VariableTracking,
)
from memfusion.errors import InvalidInput

TASKS: dict[str, LongContextTask] = {
    cls.name: cls()
    for cls in (
        NiahSingle,
        NiahMultikey,
        NiahMultivalue,
        NiahMultiquery,
        Passkey,
        VariableTracking,
        CommonWords,
        FrequentWords,
        KvLookup,
        FactsInText,
    )
}
"""The long-context tasks with their default settings, by name."""


def get_task(name: str) -> LongContextTask:
    """The registered long-context task ``name``; :class:`InvalidInput` lists the valid names."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "LongContextTask", "Sample", "get_task"]
