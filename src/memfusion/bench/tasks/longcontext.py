"""RULER-style long-context tasks, the shared machinery: samples, scorers, haystacks, length fitting.

A prompt is ``instruction + context + question``. The context is filler (a haystack of sentences,
a list of facts, a list of words) with *needles*, the pieces of text that hold the answers. The
question ends with the value delimiter ``<v>``: the answer is what a model writes next.

Definitions (tokens are those of the tokenizer passed to ``generate``; ``tok(i)`` is the number of
tokens of ``prompt[:i]``, so every position below is a difference of ``tok`` values):

- ``length``: the requested ``len(tokenizer(prompt).input_ids)`` (special tokens included); a sample
  is within +-2 % of it, or ``generate`` raises :class:`InvalidInput`;
- a needle's span starts at the whitespace that separates it from the text before it (none at the
  start of the context) and ends after its last character;
- ``depth`` of a needle: the tokens of context before it over the tokens of context that are not
  the needle, in [0, 1]: 0 = the context starts with it, 1 = the question follows it;
- ``distance``: the tokens between the needle's end and the question's start;
- ``Sample.depth`` / ``Sample.distance`` are those of the earliest answer-bearing needle (the one a
  model must remember longest); ``Sample.depths`` lists the depth of the needle of each answer. Tasks
  that aggregate over the whole context (common / frequent words) have no needle: depth 0, distance
  the whole context, ``depths == ()``.

Generators are tokenizer-agnostic: they only encode text, measure, and adjust the amount of filler
(a secant search on the filler count) until the prompt has the requested length. Everything random
comes from ``random.Random(f"{task}/{seed}/{i}")`` for sample ``i``: the same seed gives the same
samples at any length, and the keys / values of sample ``i`` do not depend on the length.
"""

from __future__ import annotations

import math
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from memfusion.errors import InvalidInput
from memfusion.models.tokenizer import (
    FILLER_ADJECTIVES,
    FILLER_ADVERBS,
    FILLER_DETERMINERS,
    FILLER_NOUNS,
    FILLER_PREPOSITIONS,
    FILLER_VERBS,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LENGTH_TOLERANCE = 0.02
"""A sample's prompt has ``length * (1 +- LENGTH_TOLERANCE)`` tokens."""


@dataclass(frozen=True)
class Sample:
    """One prompt and its answers. Invariants: ``prompt == instruction + context + question``;
    ``depth`` and every entry of ``depths`` lie in [0, 1]; ``depths`` is empty or has one entry per
    answer; ``|n_tokens - length| <= 0.02 * length``."""

    task: str
    prompt: str
    answers: tuple[str, ...]
    depth: float
    distance: int
    length: int
    n_tokens: int
    instruction: str
    context: str
    question: str
    depths: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt != self.instruction + self.context + self.question:
            raise InvalidInput("a Sample's prompt must be instruction + context + question")
        if not self.answers or not all(0.0 <= d <= 1.0 for d in (self.depth, *self.depths)):
            raise InvalidInput(f"a Sample needs answers and depths in [0, 1], got {self.answers}, {self.depths}")
        if self.depths and len(self.depths) != len(self.answers):
            raise InvalidInput(f"a Sample has one depth per answer, got {len(self.depths)} for {len(self.answers)}")

    @property
    def target(self) -> str:
        """The answer text a model should write after the prompt (training target): the answers in
        their canonical order, separated by ``", "``."""
        return ", ".join(self.answers)


# --- scorers --------------------------------------------------------------------------------

Scorer = Callable[[str, Sequence[str]], float]


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def _found(text: str, answer: str) -> bool:
    """``answer`` occurs in ``text`` as a whole token sequence (not inside a longer word or number)."""
    pattern = r"(?<![a-z0-9])" + re.escape(normalize(answer)) + r"(?![a-z0-9])"
    return re.search(pattern, text) is not None


def exact(generated: str, answers: Sequence[str]) -> float:
    """1.0 if the generated text *starts* with one of ``answers`` (after normalisation and leading
    punctuation), followed by the end or a non-alphanumeric character: ``"4821735. the"`` scores
    1 for ``4821735``, ``"48217350"`` and ``"the value is 4821735"`` score 0."""
    text = re.sub(r"^[^a-z0-9]+", "", normalize(generated))
    return float(any(re.match(re.escape(normalize(a)) + r"(?![a-z0-9])", text) is not None for a in answers))


def all_of(generated: str, answers: Sequence[str]) -> float:
    """1.0 if every answer occurs in the generated text as a whole word / number, else 0.0."""
    text = normalize(generated)
    return float(all(_found(text, a) for a in answers))


def recall(generated: str, answers: Sequence[str]) -> float:
    """The fraction of the answers that occur in the generated text as whole words / numbers."""
    text = normalize(generated)
    return sum(_found(text, a) for a in answers) / len(answers)


SCORERS: dict[str, Scorer] = {"exact": exact, "all_of": all_of, "recall": recall}


# --- haystacks ------------------------------------------------------------------------------

NOISE = "the grass is green. the sky is blue. the sun is yellow. here we go. there and back again."
"""RULER's "noise" haystack, repeated."""

_ESSAY_PATTERNS: tuple[str, ...] = ("DANVDNPDN", "DNRVDAN", "DNPDANVDN", "DAN+DNVDANR")
_POS: dict[str, tuple[str, ...]] = {
    "D": FILLER_DETERMINERS,
    "A": FILLER_ADJECTIVES,
    "N": FILLER_NOUNS,
    "V": FILLER_VERBS,
    "R": FILLER_ADVERBS,
    "P": FILLER_PREPOSITIONS,
    "+": ("and",),
}
HAYSTACKS = ("noise", "essay")


def _sentences(style: str, rng: random.Random) -> Iterator[list[str]]:
    """An endless stream of sentences (lists of words, the last one ending with ``"."``)."""
    if style == "noise":
        noise = [s.split() for s in NOISE.split(". ")]
        while True:
            for words in noise:
                yield [*words[:-1], words[-1].rstrip(".") + "."]
    while True:  # essay: random grammatical sentences over the filler words
        words = [rng.choice(_POS[c]) for c in rng.choice(_ESSAY_PATTERNS)]
        for j in range(len(words) - 1):
            if words[j] == "a" and words[j + 1][0] in "aeiou":
                words[j] = "an"
        words[-1] += "."
        yield words


@dataclass(frozen=True)
class Piece:
    """A piece of context: whitespace separator + text. ``evidence`` is the index of the answer this
    piece holds, or -1 for filler and distractors."""

    text: str
    evidence: int = -1


class Haystack:
    """The first ``m`` words of a seeded filler stream, with needles put at sentence boundaries.

    Needles are placed in the order of their target depths ``d``, each at the sentence boundary (not
    before the previous needle's) whose estimated token offset, counting the needles placed before
    it, is nearest ``d * (context tokens - its own tokens)``; needles at one boundary keep that order.
    """

    def __init__(self, style: str, rng: random.Random, counter: TokenCounter) -> None:
        self._stream = _sentences(style, rng)
        self._words: list[str] = []  # each with its leading space
        self._counter = counter

    def words(self, m: int) -> list[str]:
        while len(self._words) < m:
            self._words += [" " + w for w in next(self._stream)]
        return self._words[:m]

    def render(self, m: int, needles: Sequence[tuple[str, float, int]]) -> list[Piece]:
        """``needles``: (text with leading space, target depth, evidence index)."""
        words = self.words(m)
        cum = [0]
        for c in self._counter.pieces(words):
            cum.append(cum[-1] + c)
        boundaries = sorted({0, m, *(j + 1 for j, w in enumerate(words) if w.endswith("."))})
        ordered = sorted(needles, key=lambda x: x[1])
        costs = self._counter.pieces([text for text, _, _ in ordered])
        total = cum[m] + sum(costs)  # the context's tokens, needles included
        at: dict[int, list[Piece]] = {}
        before, last = 0, 0  # tokens of the needles placed so far; their last boundary
        for (text, d, evidence), cost in zip(ordered, costs, strict=True):
            target = d * (total - cost)
            b = min((b for b in boundaries if b >= last), key=lambda b: (abs(cum[b] + before - target), b))
            at.setdefault(b, []).append(Piece(text, evidence))
            before, last = before + cost, b
        pieces: list[Piece] = []
        start = 0
        for b in sorted(at):
            if b > start:
                pieces.append(Piece("".join(words[start:b])))
            pieces += at[b]
            start = b
        if start < m:
            pieces.append(Piece("".join(words[start:m])))
        return pieces


# --- measuring ------------------------------------------------------------------------------


class TokenCounter:
    """Counts tokens with any Hugging Face tokenizer; caches the costs of short pieces."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def ids(self, text: str) -> list[int]:
        """The ids a model sees for ``text`` (special tokens included)."""
        return list(self.tokenizer(text)["input_ids"])

    def prefix(self, text: str, end: int) -> int:
        """``tok(end)``: the tokens of ``text[:end]`` without special tokens."""
        return len(self.tokenizer(text[:end], add_special_tokens=False)["input_ids"]) if end else 0

    def pieces(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text on its own, without special tokens (cached)."""
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            for t, ids in zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"], strict=True):
                self._cache[t] = len(ids)
        return [self._cache[t] for t in texts]


@dataclass(frozen=True)
class Draft:
    """What a task draws for one sample, independent of the length: the fixed texts, the answers
    (canonical order) and ``render(s)``, the context pieces with ``s >= 0`` units of filler
    (about ``unit_tokens`` tokens each; more filler must never mean fewer tokens)."""

    instruction: str
    question: str
    answers: tuple[str, ...]
    render: Callable[[int], list[Piece]]
    unit_tokens: float


def _assemble(pieces: Sequence[Piece]) -> tuple[str, list[tuple[int, int, int]]]:
    """The context text (the first piece's separator dropped) and (evidence, start, end) character
    spans of the evidence pieces, separator included in the span's start."""
    parts: list[str] = []
    spans: list[tuple[int, int, int]] = []
    pos = 0
    for k, piece in enumerate(pieces):
        text = piece.text.lstrip() if k == 0 else piece.text
        if piece.evidence >= 0:
            spans.append((piece.evidence, pos, pos + len(text)))
        parts.append(text)
        pos += len(text)
    return "".join(parts), spans


# --- the task base class --------------------------------------------------------------------


class LongContextTask(ABC):
    """A RULER-style task: a frozen dataclass subclass sets ``name``, ``scorer`` and ``_draft``.

    ``generate(tokenizer, length, n, seed=0, depth=None)`` returns ``n`` samples; ``depth=None``
    spreads the needle over ``0, 1/(n-1), ..., 1`` (0.5 for ``n == 1``), a number puts it there.
    ``score(sample, generated_text)`` applies the task's scorer.
    """

    name: ClassVar[str]
    scorer: ClassVar[Scorer]
    has_needle: ClassVar[bool] = True

    @abstractmethod
    def _draft(self, rng: random.Random, depth: float, counter: TokenCounter, length: int) -> Draft: ...

    def score(self, sample: Sample, generated: str) -> float:
        """The sample's score in [0, 1] for the text a model generated after the prompt."""
        if sample.task != self.name:
            raise InvalidInput(f"a {sample.task!r} sample cannot be scored by the {self.name!r} task")
        return type(self).scorer(generated, sample.answers)  # via the class: a plain function, not a method

    def generate(
        self, tokenizer: PreTrainedTokenizerBase, length: int, n: int, seed: int = 0, depth: float | None = None
    ) -> list[Sample]:
        """``n`` seeded samples whose prompts have ``length`` tokens (+-2 %) with ``tokenizer``."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InvalidInput(f"length must be a positive number of tokens, got {length!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"n (the number of samples) must be an integer >= 1, got {n!r}")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and length > limit:
            raise InvalidInput(
                f"length {length} is beyond the model's limit of {limit} tokens (tokenizer.model_max_length)"
            )
        if depth is not None:
            if not self.has_needle:
                raise InvalidInput(f"task {self.name!r} has no needle (it uses the whole context): depth must be None")
            if not (isinstance(depth, int | float) and 0.0 <= depth <= 1.0):
                raise InvalidInput(f"depth must be in [0, 1] or None (spread over the samples), got {depth!r}")
        depths = [float(depth)] * n if depth is not None else [i / (n - 1) if n > 1 else 0.5 for i in range(n)]
        counter = TokenCounter(tokenizer)
        return [self._sample(counter, length, seed, i, d) for i, d in enumerate(depths)]

    def _sample(self, counter: TokenCounter, length: int, seed: int, i: int, depth: float) -> Sample:
        draft = self._draft(random.Random(f"{self.name}/{seed}/{i}"), depth, counter, length)
        memo: dict[int, tuple[str, list[tuple[int, int, int]], int]] = {}

        def build(s: int) -> int:
            if s not in memo:
                context, spans = _assemble(draft.render(s))
                memo[s] = (context, spans, len(counter.ids(draft.instruction + context + draft.question)))
            return memo[s][2]

        context, spans, n_tokens = memo[self._fit(build, length, draft.unit_tokens)]
        prompt = draft.instruction + context + draft.question
        self._check_vocabulary(counter, prompt)
        c0, q0 = len(draft.instruction), len(draft.instruction) + len(context)
        t0, tq = counter.prefix(prompt, c0), counter.prefix(prompt, q0)
        depths = [0.0] * len(spans)
        ends = [tq] * len(spans)
        for evidence, start, end in spans:
            ts, te = counter.prefix(prompt, c0 + start), counter.prefix(prompt, c0 + end)
            depths[evidence] = min(1.0, max(0.0, (ts - t0) / max(1, (tq - t0) - (te - ts))))
            ends[evidence] = te
        first = min(range(len(spans)), key=lambda e: depths[e]) if spans else -1
        return Sample(
            task=self.name,
            prompt=prompt,
            answers=draft.answers,
            depth=depths[first] if spans else 0.0,
            distance=tq - ends[first] if spans else tq - t0,
            length=length,
            n_tokens=n_tokens,
            instruction=draft.instruction,
            context=context,
            question=draft.question,
            depths=tuple(depths),
        )

    def _fit(self, count: Callable[[int], int], length: int, unit_tokens: float) -> int:
        """The filler size ``s`` whose prompt length is nearest ``length`` (secant steps, then +-1)."""
        tolerance = LENGTH_TOLERANCE * length
        c0 = count(0)
        if c0 > length + tolerance:
            raise InvalidInput(
                f"length {length} is too short for task {self.name!r}: without filler its prompt already has "
                f"{c0} tokens with this tokenizer; ask for at least {math.ceil(c0 / (1 + LENGTH_TOLERANCE))}"
            )
        seen = {0: c0}
        best, prev = 0, 0
        unit_tokens = max(unit_tokens, 0.5)
        s = max(1, round((length - c0) / unit_tokens))
        for _ in range(24):
            c = seen[s] = count(s)
            if abs(c - length) < abs(seen[best] - length):
                best = s
            if c == length:
                break
            slope = (c - seen[prev]) / (s - prev) if s != prev else 0.0
            step = round((length - c) / (slope if slope > 0 else unit_tokens))
            nxt = max(0, s + step)
            if nxt in seen:  # converged between two neighbours, or oscillating: walk one unit
                nxt = s + (1 if c < length else -1)
                if nxt < 0 or nxt in seen:
                    break
            prev, s = s, nxt
        if abs(seen[best] - length) > tolerance:
            raise InvalidInput(
                f"task {self.name!r} cannot make a prompt of {length} +- {LENGTH_TOLERANCE:.0%} tokens with this "
                f"tokenizer (nearest: {seen[best]} tokens; a filler unit is ~{unit_tokens:.0f} tokens); "
                "ask for a longer length"
            )
        return best

    def _check_vocabulary(self, counter: TokenCounter, prompt: str) -> None:
        unk = getattr(counter.tokenizer, "unk_token_id", None)
        if unk is None or unk not in counter.ids(prompt):
            return
        words = sorted(set(prompt.split()))
        encoded = counter.tokenizer(words, add_special_tokens=False)["input_ids"]
        bad = [w for w, ids in zip(words, encoded, strict=True) if unk in ids]
        raise InvalidInput(
            f"the tokenizer cannot encode words of task {self.name!r} (they become its unknown token): "
            f"{bad[:10]}; use a tokenizer whose vocabulary covers them"
        )
