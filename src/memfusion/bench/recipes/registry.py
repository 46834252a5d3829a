"""The registry of recipes, ``(model, task) -> Recipe``, with the defaults of the reproduced-results runs."""

from __future__ import annotations

from memfusion.bench.fusion_train import PASSKEY_STEPS
from memfusion.bench.recipes.base import Recipe, need
from memfusion.bench.recipes.capacity import CapacityOptions, capacity_setup
from memfusion.bench.recipes.fewshot import FewShotOptions, fewshot_setup
from memfusion.bench.recipes.passkey import PasskeyOptions, run_passkey
from memfusion.bench.recipes.sequence import SequenceOptions, sequence_setup
from memfusion.bench.recipes.tracing import TracingOptions, tracing_setup
from memfusion.bench.train import OptimizerName, Schedule

_NTM = SequenceOptions(hidden_size=100, memory_slots=128, memory_width=20, read_heads=1)
_DNC_GRAPH = SequenceOptions(hidden_size=128, memory_slots=32, memory_width=32, read_heads=4)

_RECIPES: list[Recipe] = [
    Recipe(
        "ntm",
        "copy",
        "NTM (128 x 20 memory, LSTM controller 100) copies 8-bit sequences of length 1-20; scored at 1-20 and 40",
        SequenceOptions(hidden_size=100, memory_slots=128, memory_width=20, eval_lengths=(20, 40)),
        steps=6000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("ntm", "copy"),
        target="< 0.05 bit errors per sequence at lengths 1-20; fewer errors at length 40 than the LSTM",
        paper="Graves et al. 2014, fig. 3: copy cost near 0 after about 2e5 sequences (batch 1)",
    ),
    Recipe(
        "lstm",
        "copy",
        "the baseline: a 3 x 256 LSTM with the same output layer, trained as the NTM",
        SequenceOptions(hidden_size=256, layers=3, eval_lengths=(20, 40)),
        steps=6000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("lstm", "copy"),
        target="the baseline of NTM copy (length-40 generalisation)",
        paper="Graves et al. 2014, fig. 3-4: LSTM learns copy far slower and fails beyond its training lengths",
    ),
    Recipe(
        "ntm",
        "repeat_copy",
        "NTM repeat copy: 1-10 vectors repeated 1-10 times",
        _NTM,
        steps=8000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("ntm", "repeat_copy"),
        paper="Graves et al. 2014, fig. 7",
    ),
    Recipe(
        "ntm",
        "associative_recall",
        "NTM associative recall: 2-6 items of 3 x 6 bits, query one, answer the next; scored at 12 items too",
        SequenceOptions(hidden_size=100, memory_slots=128, memory_width=20, eval_lengths=(12,)),
        steps=6000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("ntm", "associative_recall"),
        target="solved: < 0.05 bit errors per sequence at 2-6 items",
        paper="Graves et al. 2014, fig. 10: cost near 0 after about 1e5 episodes",
    ),
    Recipe(
        "ntm",
        "priority_sort",
        "NTM priority sort: 20 prioritised vectors, write the 16 highest first",
        SequenceOptions(hidden_size=100, memory_slots=128, memory_width=20, read_heads=5),
        steps=8000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("ntm", "priority_sort"),
        paper="Graves et al. 2014, fig. 16 (8 heads, feed-forward controller)",
    ),
    Recipe(
        "dnc",
        "copy",
        "DNC copy of 1-20 vectors (32 x 16 memory, 1 read head); scored at 1-20 and 40",
        SequenceOptions(hidden_size=100, memory_slots=64, memory_width=16, read_heads=1, eval_lengths=(40,)),
        steps=4000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("dnc", "copy"),
    ),
    Recipe(
        "dnc",
        "traversal",
        "DNC traversal on random graphs of 5-8 nodes: follow 1-4 labelled edges",
        _DNC_GRAPH,
        steps=6000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("dnc", "traversal"),
        paper="Graves et al. 2016: 98.8% traversal accuracy on the London Underground (curriculum, 2e7 episodes)",
    ),
    Recipe(
        "dnc",
        "shortest_path",
        "DNC shortest path on random graphs of 5-8 nodes: output the unique 1-3 hop path's edges",
        _DNC_GRAPH,
        steps=6000,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        schedule=Schedule.COSINE,
        grad_clip=1.0,
        setup=sequence_setup("dnc", "shortest_path"),
        paper="Graves et al. 2016: 55.3% shortest-path accuracy on the London Underground",
    ),
    Recipe(
        "mann",
        "fewshot",
        "MANN (LSTM 200, 4 heads, 128 x 40 memory) on 5-way episodes of 10 instances of glyph classes "
        "(-o n_way=15 for 15-way, --data PATH for Omniglot)",
        FewShotOptions(),
        steps=20000,
        batch_size=16,
        lr=1e-3,
        eval_every=1000,
        setup=fewshot_setup("mann"),
        target="5-way glyphs: accuracy >= 0.75 at the 2nd instance and >= 0.90 at the 10th",
        paper="Santoro et al. 2016, Omniglot 5-way: 36.4 / 82.8 / 94.9 / 98.1% at instances 1 / 2 / 5 / 10",
    ),
    Recipe(
        "lstm",
        "fewshot",
        "the baseline: an LSTM of 200 units with the same output layer, trained as MANN",
        FewShotOptions(),
        steps=20000,
        batch_size=16,
        lr=1e-3,
        eval_every=1000,
        setup=fewshot_setup("lstm"),
        paper="Santoro et al. 2016, Omniglot 5-way LSTM: 24.4 / 49.5 / 63.6 / 62.5% at instances 1 / 2 / 5 / 10",
    ),
    Recipe(
        "dkvmn",
        "synthetic5",
        "DKVMN (memory 20, key 50, value 200) on Synthetic-5 (2000 training, 2000 test students)",
        TracingOptions(),
        steps=1000,
        batch_size=32,
        lr=1e-3,
        eval_every=100,
        setup=tracing_setup("dkvmn", "synthetic5"),
        target="test AUC >= 0.80 and above DKT",
        paper="Zhang et al. 2017: 82.7% AUC on Synthetic-5 (DKT 80.3%)",
    ),
    Recipe(
        "dkt",
        "synthetic5",
        "the baseline: DKT (an LSTM of 200 units) on Synthetic-5, trained as DKVMN",
        TracingOptions(),
        steps=1000,
        batch_size=32,
        lr=1e-3,
        eval_every=100,
        setup=tracing_setup("dkt", "synthetic5"),
        paper="Zhang et al. 2017: DKT 80.3% AUC on Synthetic-5",
    ),
    Recipe(
        "dkvmn",
        "assistments",
        "DKVMN (memory 50) on ASSISTments 2009 skill_builder_data.csv (--data PATH), 30% of students held out",
        TracingOptions(memory_size=50),
        steps=5000,
        batch_size=32,
        lr=3e-3,
        eval_every=500,
        setup=tracing_setup("dkvmn", "assistments"),
        paper="Zhang et al. 2017: 81.6% AUC on ASSISTments 2009",
    ),
    Recipe(
        "hopfield",
        "capacity",
        "evaluation only: modern vs classical Hopfield recall of 128-dimensional ±1 patterns from 20%-flipped probes",
        CapacityOptions(),
        steps=0,
        batch_size=1,
        lr=1.0,
        eval_every=1,
        setup=capacity_setup,
        target="modern retrieves >= 99% of 1000 stored patterns; classical fails",
        paper="Ramsauer et al. 2020: exponential capacity; classical about 0.14 D = 18 patterns",
    ),
    Recipe(
        "fusion",
        "passkey",
        "the fusion layer (2-layer model, window 32) on passkey retrieval beyond the window, with memory and without",
        PasskeyOptions(),
        steps=PASSKEY_STEPS,
        batch_size=32,
        lr=3e-3,
        eval_every=250,
        run=run_passkey,
        optimizer=OptimizerName.ADAMW,
        grad_clip=1.0,
        weight_decay=0.01,
        target="exact match beyond the window >= 0.9 with memory, chance without",
        paper="Memorizing Transformers (Wu et al. 2022): kNN memory retrieves beyond the local window",
    ),
]

RECIPES: dict[tuple[str, str], Recipe] = {(r.model, r.task): r for r in _RECIPES}


def models() -> list[str]:
    """Every model name with at least one recipe, in registration order."""
    return list(dict.fromkeys(m for m, _ in RECIPES))


def tasks_of(model: str) -> list[str]:
    """The tasks ``model`` has a recipe for."""
    return [t for m, t in RECIPES if m == model]


def find_recipe(model: str, task: str | None) -> Recipe:
    """The recipe of ``model`` on ``task``; an unknown model, a missing task or an unknown combination
    raises :class:`InvalidInput` listing the valid names."""
    valid = "; ".join(f"{m}: {', '.join(tasks_of(m))}" for m in models())
    need(model in models(), f"unknown model {model!r}; valid models (and their tasks): {valid}")
    need(task is not None, f"{model} needs --task; valid tasks for {model}: {', '.join(tasks_of(model))}")
    need(
        (model, task) in RECIPES,
        f"no recipe trains {model} on {task!r}; valid tasks for {model}: {', '.join(tasks_of(model))}",
    )
    return RECIPES[(model, str(task))]
