"""RULER-style long-context tasks, checked against an independent reading of their own prompts.

Every answer is recomputed here from the prompt text alone (regular expressions, ``Counter``, a
resolution of the assignment chains); every depth and distance is recomputed from the tokenizer's
offset mapping (the generator counts tokens by re-encoding prefixes instead).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from memfusion.bench.tasks import TASKS, LongContextTask, Sample, get_task
from memfusion.bench.tasks.longcontext import SCORERS, all_of, exact, recall
from memfusion.bench.tasks.ruler import (
    CommonWords,
    FrequentWords,
    KvLookup,
    NiahMultivalue,
    NiahSingle,
    Passkey,
    VariableTracking,
)
from memfusion.bench.tasks.training import (
    IGNORE,
    TrainingExample,
    collate,
    random_position_ids,
    training_example,
    training_examples,
)
from memfusion.errors import InvalidInput
from memfusion.models.tokenizer import build_tokenizer, format_facts, format_question

NAMES = [
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "passkey",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "kv_lookup",
    "facts_in_text",
]
AGGREGATE = {"common_words", "frequent_words"}
SINGLE = {"niah_single", "niah_multikey", "passkey", "kv_lookup", "facts_in_text"}


def char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character, no special tokens added): a second,
    very different tokenizer. ``alphabet`` limits the letters it knows."""
    chars = [chr(c) for c in range(32, 127) if alphabet is None or not chr(c).isalpha() or chr(c) in alphabet]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate([*chars, "\n"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def chars() -> PreTrainedTokenizerFast:
    return char_tokenizer()


# --- an independent reading of the prompts --------------------------------------------------

NEEDLE = re.compile(r"one of the special magic numbers for ([a-z]+ [a-z]+) is <v> (\d+)\.")
STATEMENT = re.compile(r"var ([a-z]+) = (?:(\d+)|var ([a-z]+))\.")
FACT = re.compile(r"^([a-z]+ [a-z]+) <v> (\d+)$", re.MULTILINE)


def span(s: Sample, m: re.Match[str]) -> tuple[int, int]:
    """A needle's characters in the prompt, the separating whitespace before it included."""
    start = m.start() - (m.start() > 0 and s.context[m.start() - 1].isspace())
    return len(s.instruction) + start, len(s.instruction) + m.end()


def asked_keys(question: str) -> list[str]:
    keys = re.search(r"numbers? for (.+?) mentioned", question)
    assert keys is not None
    return re.split(r", | and ", keys.group(1))


def read(s: Sample) -> tuple[tuple[str, ...], list[tuple[int, int]]]:
    """The answers and the evidence spans (one per answer) read from the prompt alone."""
    if s.task in {"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"}:
        needles = list(NEEDLE.finditer(s.context))
        keys = asked_keys(s.question)
        if s.task == "niah_multikey":
            assert len(needles) == 1 + 3 and len({m.group(1) for m in needles}) == 4
        if s.task == "niah_multivalue":
            assert len(keys) == 1 and {m.group(1) for m in needles} == set(keys) and len(needles) == 4
            return tuple(m.group(2) for m in needles), [span(s, m) for m in needles]
        assert len(keys) == (4 if s.task == "niah_multiquery" else 1)
        found = []
        for key in keys:
            (m,) = [m for m in needles if m.group(1) == key]
            found.append(m)
        return tuple(m.group(2) for m in found), [span(s, m) for m in found]
    if s.task == "passkey":
        (m,) = re.finditer(r"the pass key is <v> (\d+)\. remember it\. (\d+) is the pass key\.", s.context)
        assert m.group(1) == m.group(2)
        return (m.group(1),), [span(s, m)]
    if s.task == "variable_tracking":
        statements = list(STATEMENT.finditer(s.context))
        value = {}
        for m in statements:  # a chain's statements come in order: a name is defined before it is used
            value[m.group(1)] = m.group(2) or value[m.group(3)]
        asked = re.search(r"assigned the value (\d+) in", s.question)
        assert asked is not None
        chain = [m for m in statements if value[m.group(1)] == asked.group(1)]
        return tuple(m.group(1) for m in chain), [span(s, m) for m in chain]
    if s.task == "common_words":
        items = re.findall(r"(\d+)\. ([a-z]+)", s.context)
        assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
        counts = Counter(w for _, w in items)
        common = [w for w, c in counts.items() if c == max(counts.values())]
        assert len(common) == 10 and max(c for w, c in counts.items() if w not in common) < counts[common[0]]
        return tuple(sorted(common)), []
    if s.task == "frequent_words":
        counts = Counter(s.context.split()).most_common()
        assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]  # an unambiguous top 3
        return tuple(w for w, _ in counts[:3]), []
    if s.task == "facts_in_text":
        (block,) = list(re.finditer(r"<facts>\n.*?\n</facts>\n", s.context, flags=re.S))
        facts = dict((m.group(1), m.group(2)) for m in FACT.finditer(block.group(0)))
        key = re.search(r"value of (.+)\? answer", s.question)
        assert key is not None
        return (facts[key.group(1)],), [span(s, block)]
    assert s.task == "kv_lookup"
    assert s.context.startswith("<facts>\n") and s.context.endswith("\n</facts>")
    facts = list(FACT.finditer(s.context))
    assert len(facts) == s.context.count("\n") - 1 and len({m.group(1) for m in facts}) == len(facts)
    key = re.search(r"value of (.+)\? answer", s.question)
    assert key is not None
    (m,) = [m for m in facts if m.group(1) == key.group(1)]
    return (m.group(2),), [span(s, m)]


def positions(tokenizer: PreTrainedTokenizerFast, prompt: str):  # type: ignore[no-untyped-def]
    """char -> the number of (non-special) tokens that end at or before it, from the offset mapping."""
    ends = [e for s, e in tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"] if e > s]
    return lambda char: sum(e <= char for e in ends)


# --- length, answers, depth and distance ----------------------------------------------------


def check_samples(tokenizer: PreTrainedTokenizerFast, name: str, length: int, samples: list[Sample]) -> None:
    assert len(samples) == 3
    for requested, s in zip([0.0, 0.5, 1.0], samples, strict=True):
        assert s.task == name and s.length == length
        assert s.prompt == s.instruction + s.context + s.question and s.prompt.endswith("<v>")
        n_tokens = len(tokenizer(s.prompt).input_ids)
        assert s.n_tokens == n_tokens and abs(n_tokens - length) <= 0.02 * length
        answers, spans = read(s)
        assert s.answers == answers
        at = positions(tokenizer, s.prompt)
        c0, q0 = at(len(s.instruction)), at(len(s.instruction) + len(s.context))
        ctx = q0 - c0
        if name in AGGREGATE:
            assert (s.depth, s.depths, s.distance) == (0.0, (), ctx)
            continue
        depths = []
        for start, end in spans:
            needle = at(end) - at(start)
            depths.append((at(start) - c0) / (ctx - needle))
        assert s.depths == pytest.approx(depths, abs=1e-12)
        first = min(range(len(spans)), key=lambda e: depths[e])
        assert s.depth == pytest.approx(depths[first], abs=1e-12)
        assert s.distance == q0 - at(spans[first][1])
        # the needle sits where it was asked, up to the spacing of the places it can go
        pieces = re.split(r"(?<=\.) |\n", s.context)
        spacing = max(len(tokenizer(" " + p, add_special_tokens=False).input_ids) for p in pieces) / ctx
        if name in SINGLE or requested < 1.0:
            assert abs(s.depth - requested) <= spacing + 0.01
        if name in {"niah_multivalue", "variable_tracking"}:
            assert list(s.depths) == sorted(s.depths)  # later values / hops come after the first


@pytest.mark.parametrize("length", [256, 1024, 4096])
@pytest.mark.parametrize("name", NAMES)
def test_task_with_reference_tokenizer(tok: PreTrainedTokenizerFast, name: str, length: int) -> None:
    samples = TASKS[name].generate(tok, length, 3, seed=0)
    check_samples(tok, name, length, samples)
    assert tok.unk_token_id not in tok(samples[0].prompt).input_ids


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("name", NAMES)
def test_task_is_tokenizer_agnostic(chars: PreTrainedTokenizerFast, name: str, length: int) -> None:
    check_samples(chars, name, length, TASKS[name].generate(chars, length, 3, seed=0))


def test_given_depth(tok: PreTrainedTokenizerFast) -> None:
    for name in ["niah_single", "passkey", "kv_lookup", "variable_tracking"]:
        for s in TASKS[name].generate(tok, 1024, 2, seed=3, depth=0.3):
            assert abs(s.depth - 0.3) < 0.03


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(tok: PreTrainedTokenizerFast, name: str) -> None:
    a = TASKS[name].generate(tok, 512, 3, seed=5)
    assert a == TASKS[name].generate(tok, 512, 3, seed=5)
    b = TASKS[name].generate(tok, 512, 3, seed=6)
    assert all(x.prompt != y.prompt for x, y in zip(a, b, strict=True))
    assert len({x.prompt for x in a}) == 3


def test_answers_do_not_depend_on_the_length(tok: PreTrainedTokenizerFast) -> None:
    short, long = TASKS["niah_single"].generate(tok, 256, 4), TASKS["niah_single"].generate(tok, 2048, 4)
    assert [s.answers for s in short] == [s.answers for s in long]
    assert len({s.answers for s in short}) == 4


def test_kv_lookup_uses_the_fact_format(tok: PreTrainedTokenizerFast) -> None:
    (s,) = TASKS["kv_lookup"].generate(tok, 512, 1, seed=2)
    facts = [(m.group(1), m.group(2)) for m in FACT.finditer(s.context)]
    assert s.context == format_facts(facts)
    key = next(k for k, v in facts if v == s.answers[0])
    assert s.question == "\n" + format_question(key)


def test_facts_in_text_holds_one_fact_block_with_the_answer(tok: PreTrainedTokenizerFast) -> None:
    for i, s in enumerate(TASKS["facts_in_text"].generate(tok, 400, 5, seed=3)):
        (block,) = re.findall(r"<facts>\n.*?\n</facts>", s.context, flags=re.S)
        facts = [(m.group(1), m.group(2)) for m in FACT.finditer(block)]
        assert block == format_facts(facts) and len(facts) == 4
        asked = s.question.removeprefix("\n" + "question: what is the value of ").split("?")[0]
        assert s.question == "\n" + format_question(asked)
        assert dict(facts)[asked] == s.answers[0] and len(s.answers[0]) == 4
        assert s.depth == pytest.approx(i / 4, abs=0.1)


def test_configured_tasks(tok: PreTrainedTokenizerFast) -> None:
    (s,) = NiahMultivalue(n_values=2, value_digits=3, haystack="noise").generate(tok, 300, 1)
    assert len(s.answers) == 2 and all(len(a) == 3 for a in s.answers)
    assert "the grass is green." in s.context
    (s,) = VariableTracking(n_chains=3, n_hops=2).generate(tok, 512, 1)
    assert len(STATEMENT.findall(s.context)) == 9 and len(s.answers) == 3
    assert read(s)[0] == s.answers  # the distractor chains resolve to other values
    (s,) = CommonWords(n_common=3, freq_common=5, freq_uncommon=2).generate(tok, 400, 1)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", s.context))
    assert sorted(w for w, c in counts.items() if c == 5) == list(s.answers) and set(counts.values()) == {2, 5}
    (s,) = FrequentWords(top_k=5, alpha=1.5).generate(tok, 2048, 1)
    top = Counter(s.context.split()).most_common(6)
    assert s.answers == tuple(w for w, _ in top[:5]) and top[4][1] > top[5][1]


# --- scorers --------------------------------------------------------------------------------


def test_exact() -> None:
    assert exact("4821735", ["4821735"]) == 1.0
    assert exact(" 4821735. the grass is green", ["4821735"]) == 1.0
    assert exact("  4821735\n", ["4821735"]) == 1.0
    assert exact("Amber", ["amber"]) == 1.0
    assert exact("12", ["11", "12"]) == 1.0
    assert exact("48217350", ["4821735"]) == 0.0
    assert exact("482173", ["4821735"]) == 0.0
    assert exact("123 12", ["12"]) == 0.0  # the answer must come first, not just occur
    assert exact("the value is 4821735", ["4821735"]) == 0.0
    assert exact("", ["4821735"]) == 0.0


def test_all_of_and_recall() -> None:
    names = ["ada", "ben", "cid", "dex"]
    assert all_of("ada, ben, cid and dex", names) == 1.0
    assert all_of("dex cid ben ada", names) == 1.0
    assert all_of("ada, ben, cid", names) == 0.0
    assert all_of("adam ben cid dex", names) == 0.0  # "ada" inside "adam" is not "ada"
    assert recall("ada, ben", names) == 0.5
    assert recall("Ada BEN cid", names) == 0.75
    assert recall("", names) == 0.0
    assert recall("x 123 y", ["123", "12"]) == 0.5
    assert set(SCORERS) == {"exact", "all_of", "recall"} and SCORERS["exact"] is exact


def test_task_scores(tok: PreTrainedTokenizerFast) -> None:
    (s,) = TASKS["niah_single"].generate(tok, 256, 1)
    assert TASKS["niah_single"].score(s, " " + s.target + ".") == 1.0
    assert TASKS["niah_single"].score(s, "0" + s.target) == 0.0
    (m,) = TASKS["niah_multivalue"].generate(tok, 256, 1)
    assert TASKS["niah_multivalue"].score(m, m.target) == 1.0
    assert TASKS["niah_multivalue"].score(m, ", ".join(m.answers[:2])) == 0.5
    (c,) = TASKS["common_words"].generate(tok, 256, 1)
    assert TASKS["common_words"].score(c, " ".join(c.answers[:3])) == pytest.approx(0.3)
    with pytest.raises(InvalidInput, match="cannot be scored"):
        TASKS["passkey"].score(s, s.target)


# --- registry and bad input -----------------------------------------------------------------


def test_registry() -> None:
    assert sorted(TASKS) == sorted(NAMES)
    for name, task in TASKS.items():
        assert isinstance(task, LongContextTask) and task.name == name and get_task(name) is task
    with pytest.raises(InvalidInput, match=r"unknown task 'nope'.*kv_lookup.*variable_tracking"):
        get_task("nope")


def test_registry_import_is_light() -> None:
    code = (
        "import sys, memfusion.bench.tasks\n"
        "print(','.join(m for m in ('torch', 'transformers', 'tokenizers', 'memfusion.bench.tasks.algorithmic')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", NAMES)
def test_too_short(tok: PreTrainedTokenizerFast, name: str) -> None:
    with pytest.raises(InvalidInput, match=r"too short.*at least"):
        TASKS[name].generate(tok, 40, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length": 0, "n": 1}, "length"),
        ({"length": 1.5, "n": 1}, "length"),
        ({"length": 512, "n": 0}, "n "),
        ({"length": 512, "n": 1, "depth": 1.5}, "depth"),
        ({"length": 512, "n": 1, "depth": -0.1}, "depth"),
    ],
)
def test_bad_generate_arguments(tok: PreTrainedTokenizerFast, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        TASKS["niah_single"].generate(tok, **kwargs)


def test_depth_for_a_task_without_needle(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InvalidInput, match="no needle"):
        TASKS["common_words"].generate(tok, 512, 1, depth=0.5)


def test_beyond_the_model_limit() -> None:
    limited = build_tokenizer(model_max_length=512)
    assert len(TASKS["passkey"].generate(limited, 512, 1)) == 1
    with pytest.raises(InvalidInput, match="beyond the model's limit of 512"):
        TASKS["passkey"].generate(limited, 1024, 1)


def test_tokenizer_that_cannot_spell_the_task() -> None:
    with pytest.raises(InvalidInput, match="cannot encode words"):
        TASKS["niah_single"].generate(char_tokenizer(alphabet="abcdefghijklm"), 1024, 1)


def test_too_long_for_the_key_space(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InvalidInput, match="distinct keys"):
        KvLookup(value_digits=1).generate(tok, 60_000, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NiahSingle(haystack="lorem"),
        lambda: NiahSingle(value_digits=0),
        lambda: NiahMultivalue(n_values=0),
        lambda: Passkey(digits=0),
        lambda: VariableTracking(n_chains=20, n_hops=10),
        lambda: VariableTracking(n_hops=0),
        lambda: CommonWords(freq_common=3, freq_uncommon=3),
        lambda: CommonWords(freq_common=1),
        lambda: FrequentWords(alpha=math.nan),
        lambda: FrequentWords(top_k=0),
        lambda: KvLookup(value_digits=0),
    ],
)
def test_bad_task_settings(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput):
        make()


def test_too_many_distinct_values(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InvalidInput, match="distinct numbers"):
        NiahMultivalue(n_values=12, value_digits=1).generate(tok, 1024, 1)


# --- training examples ----------------------------------------------------------------------


def test_training_example(tok: PreTrainedTokenizerFast) -> None:
    (s,) = TASKS["niah_multiquery"].generate(tok, 256, 1, seed=9)
    e = training_example(tok, s)
    prompt = tok(s.prompt).input_ids
    answer = tok(" " + s.target, add_special_tokens=False).input_ids
    assert list(e.input_ids) == prompt + answer + [tok.eos_token_id]
    assert list(e.loss_mask) == [0] * len(prompt) + [1] * (len(answer) + 1)
    assert tok.decode([t for t, m in zip(e.input_ids, e.loss_mask, strict=True) if m]) == " " + s.target + "</s>"
    assert e.labels() == [IGNORE] * len(prompt) + answer + [tok.eos_token_id]
    assert e.n_answer == len(answer) + 1 and (e.task, e.length) == ("niah_multiquery", 256)


def test_training_examples_and_collate(tok: PreTrainedTokenizerFast) -> None:
    examples = training_examples(tok, ["passkey", TASKS["kv_lookup"]], [128, 256], n=2, seed=11)
    assert [(e.task, e.length) for e in examples] == [
        (t, n) for t in ("passkey", "kv_lookup") for n in (128, 256) for _ in range(2)
    ]
    for e in examples:
        assert abs((len(e.input_ids) - e.n_answer) - e.length) <= 0.02 * e.length
    batch = collate(examples, pad_id=tok.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (8, width) for k in batch}
    for row, e in enumerate(examples):
        k = len(e.input_ids)
        assert batch["input_ids"][row].tolist() == [*e.input_ids, *[tok.pad_token_id] * (width - k)]
        assert batch["labels"][row].tolist() == [*e.labels(), *[IGNORE] * (width - k)]
        assert batch["attention_mask"][row].tolist() == [1] * k + [0] * (width - k)
    with pytest.raises(InvalidInput):
        training_examples(tok, [], [128], n=1)
    with pytest.raises(InvalidInput, match="unknown task"):
        training_examples(tok, ["nope"], [128], n=1)


def test_bad_training_example() -> None:
    with pytest.raises(InvalidInput):
        TrainingExample((1, 2, 3), (0, 1, 0), "passkey", 3)
    with pytest.raises(InvalidInput):
        TrainingExample((1, 2), (0, 0), "passkey", 2)


def test_random_position_ids() -> None:
    pos = random_position_ids(4, 64, 1000, torch.Generator().manual_seed(0))
    assert pos.shape == (4, 64) and pos.dtype == torch.long
    assert bool((pos[:, 1:] > pos[:, :-1]).all()) and int(pos.min()) >= 0 and int(pos.max()) < 1000
    assert torch.equal(pos, random_position_ids(4, 64, 1000, torch.Generator().manual_seed(0)))
    assert int(pos.max()) > 64  # spread over the long range, not 0..T-1
    with pytest.raises(InvalidInput):
        random_position_ids(1, 10, 5, torch.Generator())
