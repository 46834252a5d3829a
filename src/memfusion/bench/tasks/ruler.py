"""The RULER-style tasks (Hsieh et al. 2024, "RULER: what's the real context size of your long-context
language models?"): needle-in-a-haystack variants, passkey, variable tracking, common / frequent
words, and a key-value lookup QA in the engine's fact format.

Templates follow RULER's, in lower case (the reference vocabulary has no capitals), with the value
delimiter ``<v>`` before every value and at the end of every prompt. Keys are ``"adjective noun"``
pairs, values random numbers without a leading zero, variable names from
:data:`memfusion.models.tokenizer.NAMES`. Each task is a frozen dataclass whose fields are its
knobs; :data:`memfusion.bench.tasks.TASKS` holds one instance of each with the defaults.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from memfusion.bench.tasks.longcontext import (
    HAYSTACKS,
    Draft,
    Haystack,
    LongContextTask,
    Piece,
    Scorer,
    TokenCounter,
    exact,
    recall,
)
from memfusion.errors import InvalidInput
from memfusion.models.tokenizer import (
    FACTS_BEGIN,
    FACTS_END,
    FILLER_ADJECTIVES,
    FILLER_NOUNS,
    FILLER_VERBS,
    KEY_ADJECTIVES,
    KEY_NOUNS,
    NAMES,
    VALUE_DELIMITER,
    format_fact,
    format_question,
)
from memfusion.models.tokenizer import format_facts as format_facts  # re-exported: the kv_lookup format

V = VALUE_DELIMITER
N_KEYS = len(KEY_ADJECTIVES) * len(KEY_NOUNS)
WORD_POOL: tuple[str, ...] = tuple(sorted(set(FILLER_NOUNS + FILLER_ADJECTIVES + FILLER_VERBS)))
"""The words of the common / frequent words tasks."""


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


def _keys(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct ``"adjective noun"`` keys."""
    return [
        f"{KEY_ADJECTIVES[j // len(KEY_NOUNS)]} {KEY_NOUNS[j % len(KEY_NOUNS)]}" for j in rng.sample(range(N_KEYS), k)
    ]


def _numbers(rng: random.Random, k: int, digits: int, distinct: bool = True) -> list[str]:
    """``k`` numbers of exactly ``digits`` digits (no leading zero), distinct unless told otherwise."""
    span = range(10 ** (digits - 1) if digits > 1 else 0, 10**digits)
    if not distinct:
        return [str(rng.choice(span)) for _ in range(k)]
    _need(k <= len(span), f"cannot draw {k} distinct numbers of {digits} digits; use more digits")
    return [str(x) for x in rng.sample(span, k)]


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _later(rng: random.Random, depth: float, k: int) -> list[float]:
    """``k`` sorted depths in [depth, 1]: the other evidence of a sample comes after its first needle."""
    return sorted(rng.uniform(depth, 1.0) for _ in range(k))


def _haystack_draft(
    rng: random.Random,
    style: str,
    counter: TokenCounter,
    instruction: str,
    question: str,
    answers: Sequence[str],
    needles: Sequence[tuple[str, float, int]],
) -> Draft:
    hay = Haystack(style, random.Random(rng.getrandbits(64)), counter)
    costs = counter.pieces(hay.words(200))
    return Draft(instruction, question, tuple(answers), lambda m: hay.render(m, needles), sum(costs) / len(costs))


# --- needle in a haystack -------------------------------------------------------------------

NIAH_INSTRUCTION = (
    "some special magic numbers are hidden within the following text. make sure to memorize it. "
    "i will quiz you about the numbers afterwards.\n"
)
NIAH_NEEDLE = " one of the special magic numbers for {key} is " + V + " {value}."
NIAH_QUESTION = (
    "\nwhat is the special magic number for {key} mentioned in the provided text? "
    "the special magic number for {key} mentioned in the provided text is " + V
)
NIAH_QUESTION_ALL = (
    "\nwhat are all the special magic numbers for {key} mentioned in the provided text? "
    "the special magic numbers for {key} mentioned in the provided text are " + V
)


@dataclass(frozen=True)
class _Niah(LongContextTask):
    """Shared knobs: ``haystack`` ("essay": grammatical random sentences, or "noise": RULER's
    repeated sentences) and ``value_digits`` (RULER: 7)."""

    haystack: str = "essay"
    value_digits: int = 7

    def __post_init__(self) -> None:
        _need(self.haystack in HAYSTACKS, f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        _need(1 <= self.value_digits <= 18, f"value_digits must be in [1, 18], got {self.value_digits}")

    def _needle(self, key: str, value: str) -> str:
        return NIAH_NEEDLE.format(key=key, value=value)


@dataclass(frozen=True)
class NiahSingle(_Niah):
    """One needle ``"one of the special magic numbers for KEY is <v> VALUE."``; answer: VALUE."""

    name: ClassVar[str] = "niah_single"
    scorer: ClassVar[Scorer] = exact

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        (key,), (value,) = _keys(rng, 1), _numbers(rng, 1, self.value_digits)
        needles = [(self._needle(key, value), depth, 0)]
        question = NIAH_QUESTION.format(key=key)
        return _haystack_draft(rng, self.haystack, counter, NIAH_INSTRUCTION, question, [value], needles)


@dataclass(frozen=True)
class NiahMultikey(_Niah):
    """The needle plus ``n_distractors`` needles of other keys at random depths; answer: the asked
    key's value."""

    name: ClassVar[str] = "niah_multikey"
    scorer: ClassVar[Scorer] = exact
    n_distractors: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(0 <= self.n_distractors <= 1000, f"n_distractors must be in [0, 1000], got {self.n_distractors}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        keys, values = _keys(rng, 1 + self.n_distractors), _numbers(rng, 1 + self.n_distractors, self.value_digits)
        needles = [(self._needle(keys[0], values[0]), depth, 0)]
        needles += [(self._needle(k, v), rng.random(), -1) for k, v in zip(keys[1:], values[1:], strict=True)]
        question = NIAH_QUESTION.format(key=keys[0])
        return _haystack_draft(rng, self.haystack, counter, NIAH_INSTRUCTION, question, values[:1], needles)


@dataclass(frozen=True)
class NiahMultivalue(_Niah):
    """``n_values`` needles with the same key and different values (the first at the requested
    depth, the others after it); answers: every value, in context order."""

    name: ClassVar[str] = "niah_multivalue"
    scorer: ClassVar[Scorer] = recall
    n_values: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(1 <= self.n_values <= 100, f"n_values must be in [1, 100], got {self.n_values}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        (key,), values = _keys(rng, 1), _numbers(rng, self.n_values, self.value_digits)
        depths = [depth, *_later(rng, depth, self.n_values - 1)]
        needles = [(self._needle(key, v), d, e) for e, (v, d) in enumerate(zip(values, depths, strict=True))]
        question = NIAH_QUESTION_ALL.format(key=key)
        return _haystack_draft(rng, self.haystack, counter, NIAH_INSTRUCTION, question, values, needles)


@dataclass(frozen=True)
class NiahMultiquery(_Niah):
    """``n_queries`` needles with different keys, all asked at once (the first needle at the
    requested depth, the others after it); answers: the values in the order the question lists
    the keys."""

    name: ClassVar[str] = "niah_multiquery"
    scorer: ClassVar[Scorer] = recall
    n_queries: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(1 <= self.n_queries <= 100, f"n_queries must be in [1, 100], got {self.n_queries}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        keys, values = _keys(rng, self.n_queries), _numbers(rng, self.n_queries, self.value_digits)
        depths = [depth, *_later(rng, depth, self.n_queries - 1)]
        needles = [(self._needle(k, v), depths[e], e) for e, (k, v) in enumerate(zip(keys, values, strict=True))]
        order = rng.sample(range(self.n_queries), self.n_queries)  # the question lists the keys shuffled
        needles = [(text, d, order.index(e)) for text, d, e in needles]
        question = NIAH_QUESTION_ALL.format(key=_listing([keys[j] for j in order]))
        answers = [values[j] for j in order]
        return _haystack_draft(rng, self.haystack, counter, NIAH_INSTRUCTION, question, answers, needles)


# --- passkey --------------------------------------------------------------------------------

PASSKEY_INSTRUCTION = (
    "there is an important info hidden inside a lot of irrelevant text. find it and memorize it. "
    "i will quiz you about the important information there.\n"
)
PASSKEY_NEEDLE = " the pass key is " + V + " {key}. remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nwhat is the pass key? the pass key is " + V


@dataclass(frozen=True)
class Passkey(LongContextTask):
    """Passkey retrieval (Mohtashami & Jaggi 2023) in RULER's noise haystack; answer: the passkey."""

    name: ClassVar[str] = "passkey"
    scorer: ClassVar[Scorer] = exact
    digits: int = 5
    haystack: str = "noise"

    def __post_init__(self) -> None:
        _need(1 <= self.digits <= 18, f"digits must be in [1, 18], got {self.digits}")
        _need(self.haystack in HAYSTACKS, f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        (key,) = _numbers(rng, 1, self.digits)
        needles = [(PASSKEY_NEEDLE.format(key=key), depth, 0)]
        return _haystack_draft(rng, self.haystack, counter, PASSKEY_INSTRUCTION, PASSKEY_QUESTION, [key], needles)


# --- variable tracking ----------------------------------------------------------------------

VT_INSTRUCTION = "memorize and track the chain of variable assignments hidden in the following text.\n"
VT_QUESTION = (
    "\nquestion: find all variables that are assigned the value {value} in the text above. answer: according "
    "to the chain of variable assignments in the text above, {count} variables are assigned the value {value}, "
    "they are " + V
)


@dataclass(frozen=True)
class VariableTracking(LongContextTask):
    """Multi-hop assignment chains ``var a = 12345. ... var b = var a. ... var c = var b.``, one per
    chain, statements in chain order; the question gives the first chain's value; answers: that
    chain's variables in chain order. The first chain's first statement sits at the requested
    depth, its hops after it; the other chains (distractors, other values) anywhere."""

    name: ClassVar[str] = "variable_tracking"
    scorer: ClassVar[Scorer] = recall
    n_chains: int = 1
    n_hops: int = 4
    value_digits: int = 5
    haystack: str = "noise"

    def __post_init__(self) -> None:
        _need(self.n_chains >= 1 and self.n_hops >= 1, f"n_chains and n_hops must be >= 1, got {self}")
        _need(
            self.n_chains * (self.n_hops + 1) <= len(NAMES),
            f"n_chains * (n_hops + 1) must be <= {len(NAMES)} (the variable names), got {self}",
        )
        _need(1 <= self.value_digits <= 18, f"value_digits must be in [1, 18], got {self.value_digits}")
        _need(self.haystack in HAYSTACKS, f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        names = rng.sample(NAMES, self.n_chains * (self.n_hops + 1))
        values = _numbers(rng, self.n_chains, self.value_digits)
        needles: list[tuple[str, float, int]] = []
        for c in range(self.n_chains):
            chain = names[c * (self.n_hops + 1) : (c + 1) * (self.n_hops + 1)]
            start = depth if c == 0 else rng.random()
            depths = [start, *_later(rng, start, self.n_hops)]
            texts = [f" var {chain[0]} = {values[c]}."] + [f" var {b} = var {a}." for a, b in itertools.pairwise(chain)]
            needles += [(t, d, j if c == 0 else -1) for j, (t, d) in enumerate(zip(texts, depths, strict=True))]
        question = VT_QUESTION.format(value=values[0], count=self.n_hops + 1)
        answers = names[: self.n_hops + 1]
        return _haystack_draft(rng, self.haystack, counter, VT_INSTRUCTION, question, answers, needles)


# --- common words / frequent words ----------------------------------------------------------

CWE_INSTRUCTION = (
    "below is a numbered list of words. in these words, some appear more often than others. "
    "memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    "\nquestion: what are the {k} most common words in the above list? "
    "answer: the top {k} words that appear most often in the list are " + V
)


@dataclass(frozen=True)
class CommonWords(LongContextTask):
    """A numbered list ``1. w 2. w ...`` where ``n_common`` words appear ``freq_common`` times each
    and the others ``freq_uncommon`` times; answers: the common words, alphabetically.

    Frequencies ``None`` scale with the length (RULER uses 30 / 3 at about 4K tokens): the common
    words fill about a third of the list and the uncommon ones repeat only as often as the word
    pool requires; always ``freq_uncommon < freq_common``. The filler unit is one uncommon word.
    """

    name: ClassVar[str] = "common_words"
    scorer: ClassVar[Scorer] = recall
    has_needle: ClassVar[bool] = False
    n_common: int = 10
    freq_common: int | None = None
    freq_uncommon: int | None = None

    def __post_init__(self) -> None:
        _need(1 <= self.n_common <= 50, f"n_common must be in [1, 50], got {self.n_common}")
        _need(self.freq_common is None or self.freq_common >= 2, f"freq_common must be >= 2 or None, got {self}")
        _need(self.freq_uncommon is None or self.freq_uncommon >= 1, f"freq_uncommon must be >= 1 or None, got {self}")
        if self.freq_common is not None and self.freq_uncommon is not None:
            _need(self.freq_uncommon < self.freq_common, f"freq_uncommon must be < freq_common, got {self}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        words = rng.sample(WORD_POOL, len(WORD_POOL))
        common, rare = sorted(words[: self.n_common]), words[self.n_common :]
        instruction, question = CWE_INSTRUCTION, CWE_QUESTION.format(k=self.n_common)
        item = sum(counter.pieces([f" {n}. {w}" for n, w in zip((7, 77, 777), words, strict=False)])) / 3
        items = max(0.0, length - len(counter.ids(instruction + question))) / item  # about how many fit
        f_c = self.freq_common or max(2, int(items) // (3 * self.n_common))
        f_u = self.freq_uncommon or max(1, math.ceil((items - self.n_common * f_c) / (0.8 * len(rare))))
        if self.freq_common is None:
            f_c = max(f_c, f_u + 1)
        else:
            f_u = min(f_u, f_c - 1)
        base = rng.getrandbits(64)

        def render(u: int) -> list[Piece]:
            _need(u <= len(rare), f"common_words: length {length} needs more than the {len(rare)} uncommon words")
            listed = common * f_c + rare[:u] * f_u
            random.Random(f"{base}/{u}").shuffle(listed)
            return [Piece(f" {n}. {w}") for n, w in enumerate(listed, start=1)]

        return Draft(instruction, question, tuple(common), render, item * f_u)


FWE_INSTRUCTION = (
    "read the following coded text and track the frequency of each coded word. "
    "find the {k} most frequently appeared coded words.\n"
)
FWE_QUESTION = (
    "\nquestion: what are the {k} most frequently appeared words in the above coded text? "
    "answer: according to the coded text above, the {k} most frequently appeared words are " + V
)


@dataclass(frozen=True)
class FrequentWords(LongContextTask):
    """A text of words whose counts follow Zipf's law (rank ``r`` has share ``r^-alpha``); answers:
    the ``top_k`` most frequent words, most frequent first. Counts are ``floor(N p_r)`` (the rest
    goes to rank 1) with ``N`` large enough that the top ``top_k + 1`` counts strictly decrease, so
    the answer is unambiguous. The filler unit is one word."""

    name: ClassVar[str] = "frequent_words"
    scorer: ClassVar[Scorer] = recall
    has_needle: ClassVar[bool] = False
    top_k: int = 3
    alpha: float = 2.0

    def __post_init__(self) -> None:
        _need(1 <= self.top_k <= 20, f"top_k must be in [1, 20], got {self.top_k}")
        _need(math.isfinite(self.alpha) and 0.5 <= self.alpha <= 4.0, f"alpha must be in [0.5, 4], got {self.alpha}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        ranked = rng.sample(WORD_POOL, len(WORD_POOL))
        weights = [r**-self.alpha for r in range(1, len(ranked) + 1)]
        p = [w / sum(weights) for w in weights]
        n_min = max(math.floor(1 / (p[r] - p[r + 1])) + 1 for r in range(self.top_k))
        base = rng.getrandbits(64)

        def render(s: int) -> list[Piece]:
            n = n_min + s
            counts = [math.floor(n * q) for q in p]
            counts[0] += n - sum(counts)
            text = [w for w, c in zip(ranked, counts, strict=True) for _ in range(c)]
            random.Random(f"{base}/{s}").shuffle(text)
            return [Piece(" " + " ".join(text))]

        costs = counter.pieces([" " + w for w in ranked[:20]])
        instruction, question = FWE_INSTRUCTION.format(k=self.top_k), FWE_QUESTION.format(k=self.top_k)
        return Draft(instruction, question, tuple(ranked[: self.top_k]), render, sum(costs) / len(costs))


# --- key-value lookup -----------------------------------------------------------------------

KV_INSTRUCTION = (
    "below is a list of facts. each fact gives a key and its value. remember them. "
    "i will ask you about the value of one key.\n"
)


@dataclass(frozen=True)
class KvLookup(LongContextTask):
    """A block of ``key <v> value`` facts (:func:`memfusion.models.tokenizer.format_facts`, the
    format the engine puts retrieved facts in) and :func:`~memfusion.models.tokenizer.format_question`
    about one key; answer: its value. Keys are distinct; the filler unit is one more fact."""

    name: ClassVar[str] = "kv_lookup"
    scorer: ClassVar[Scorer] = exact
    value_digits: int = 7

    def __post_init__(self) -> None:
        _need(1 <= self.value_digits <= 18, f"value_digits must be in [1, 18], got {self.value_digits}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        (key,), (value,) = _keys(rng, 1), _numbers(rng, 1, self.value_digits)
        base = rng.getrandbits(64)

        def render(s: int) -> list[Piece]:
            _need(s < N_KEYS, f"kv_lookup: length {length} needs more facts than its {N_KEYS} distinct keys")
            draw = random.Random(f"{base}/{s}")
            keys = [k for k in _keys(draw, s + 1) if k != key][:s]
            facts = [
                Piece("\n" + format_fact(k, v))
                for k, v in zip(keys, _numbers(draw, s, self.value_digits, distinct=False), strict=True)
            ]
            facts.insert(round(depth * s), Piece("\n" + format_fact(key, value), evidence=0))
            return [Piece(FACTS_BEGIN), *facts, Piece("\n" + FACTS_END)]

        unit = counter.pieces(["\n" + format_fact(key, value)])[0]
        return Draft(KV_INSTRUCTION, "\n" + format_question(key), (value,), render, float(unit))


FACTS_IN_TEXT_INSTRUCTION = "read the following text and the facts in it. i will ask you about the value of one key.\n"


@dataclass(frozen=True)
class FactsInText(LongContextTask):
    """Essay text with one block of ``n_facts`` facts in the engine's format
    (:func:`~memfusion.models.tokenizer.format_facts`) at the requested depth, then
    :func:`~memfusion.models.tokenizer.format_question` about one of them; answer: its value. This
    is the prompt of :class:`memfusion.Engine` when it puts retrieved facts after a document."""

    name: ClassVar[str] = "facts_in_text"
    scorer: ClassVar[Scorer] = exact
    n_facts: int = 4
    value_digits: int = 4

    def __post_init__(self) -> None:
        _need(1 <= self.n_facts <= 64, f"n_facts must be in [1, 64], got {self.n_facts}")
        _need(1 <= self.value_digits <= 18, f"value_digits must be in [1, 18], got {self.value_digits}")

    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft:
        keys, values = _keys(rng, self.n_facts), _numbers(rng, self.n_facts, self.value_digits, distinct=False)
        asked = rng.randrange(self.n_facts)
        block = " " + format_facts(list(zip(keys, values, strict=True))) + "\n"
        needles = [(block, depth, 0)]
        question = "\n" + format_question(keys[asked])
        return _haystack_draft(rng, "essay", counter, FACTS_IN_TEXT_INSTRUCTION, question, [values[asked]], needles)
