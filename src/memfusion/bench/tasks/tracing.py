"""Knowledge tracing data (DKT, Piech et al. 2015; DKVMN, Zhang et al. 2017) and its metric, the AUC.

A student's history is a sequence of (question, response) pairs; a model reads the history up to
step ``t - 1`` and predicts the probability that the response at ``t`` is correct. Data comes as
:class:`KTSequences`: question ids (N, T) long in ``[0, n_questions)``, responses (N, T) long in
{0, 1}, mask (N, T) bool (False on padding, where question and response are 0). Rows are padded
at the end.

- :class:`Synthetic5` generates the DKT paper's simulated data: ``n_concepts = 5`` hidden concepts,
  ``n_exercises = 50`` exercises, each with one concept and a difficulty ``beta``; every student
  answers the same 50 exercises in the same order; a student has a latent skill ``alpha`` per concept
  and answers correctly with the IRT probability with guessing ``p = c + (1 - c) / (1 + exp(beta - alpha))``
  (``c = 0.25``); after each exercise the student's skill in its concept grows by the student's
  learning rate (students learn as they practise). 2000 training and 2000 test students by default.
  The skills' distribution is fitted to the data the DKT authors released
  (``chrispiech/DeepKnowledgeTracing``, ``data/synthetic/naive_c5_q50_s4000_v0.csv``): a general
  ability shared by the concepts plus a deviation per concept, and slow learning (see
  :class:`Synthetic5`).
- :func:`load_assistments` reads the public ASSISTments ``skill_builder_data.csv`` layout;
  :func:`load_three_line` the three-line layout of the DKVMN release and pykt (its Synthetic-5
  train / test splits among them).
- :func:`auc` is the ROC AUC by ranks (Mann-Whitney U, ties counted one half).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memfusion.errors import InvalidInput


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclasses.dataclass(frozen=True, eq=False)
class KTSequences:
    """Padded interaction sequences.

    questions, responses: (N, T) long; mask: (N, T) bool, each row's True steps are a prefix;
    students: (N,) long, the student a row belongs to (a long history is cut into several rows);
    question_names: one name per question id (``len == n_questions``). Invariant: questions lie in
    ``[0, n_questions)``, responses in {0, 1}, and both are 0 where mask is False.
    """

    questions: Tensor
    responses: Tensor
    mask: Tensor
    students: Tensor
    question_names: tuple[str, ...]

    def __post_init__(self) -> None:
        q, r, m = self.questions, self.responses, self.mask
        _need(
            q.dim() == 2 and q.shape == r.shape == m.shape and self.students.shape == (q.shape[0],),
            f"questions, responses, mask must be (N, T) and students (N,); got {tuple(q.shape)}, "
            f"{tuple(r.shape)}, {tuple(m.shape)}, {tuple(self.students.shape)}",
        )

    @property
    def n_questions(self) -> int:
        return len(self.question_names)

    def __len__(self) -> int:
        return int(self.questions.shape[0])

    def one_based(self) -> Tensor:
        """(N, T) long: question ids shifted to ``1 .. n_questions`` with 0 on padding (the convention of
        embedding tables with a padding row, e.g. :class:`memfusion.neural.dkvmn.DKVMN`)."""
        return (self.questions + 1) * self.mask.long()

    def select(self, rows: Tensor | Sequence[int]) -> KTSequences:
        """The rows ``rows``, trimmed to their longest remaining sequence."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        m = self.mask[idx]
        t = int(m.sum(1).max()) if len(idx) else 0
        return KTSequences(
            self.questions[idx, :t], self.responses[idx, :t], m[:, :t], self.students[idx], self.question_names
        )

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[KTSequences]:
        """Consecutive batches of ``batch_size`` rows (the last may be smaller); shuffled when a generator is given."""
        _need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for lo in range(0, n, batch_size):
            yield self.select(order[lo : lo + batch_size])

    def split_by_student(self, test_fraction: float, seed: int = 0) -> tuple[KTSequences, KTSequences]:
        """(train, test): a seeded random ``test_fraction`` of the *students* go to test, with all their rows."""
        _need(0.0 < test_fraction < 1.0, f"test_fraction must lie in (0, 1), got {test_fraction}")
        students = torch.unique(self.students)
        _need(len(students) >= 2, "splitting needs at least two students")
        n_test = min(max(1, round(test_fraction * len(students))), len(students) - 1)
        perm = torch.randperm(len(students), generator=torch.Generator().manual_seed(seed))
        test_students = students[perm[:n_test]]
        is_test = torch.isin(self.students, test_students)
        return self.select(torch.nonzero(~is_test).flatten()), self.select(torch.nonzero(is_test).flatten())


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticKT:
    """Synthetic-5 data and the latent truth that generated it.

    concept: (E,) long, each exercise's concept; difficulty: (E,) float, its ``beta``.
    skill, prob: (S, E) float for all ``S = n_train + n_test`` students (train first): the skill
    ``alpha`` in the exercise's concept *before* answering step ``t``, and the probability of a
    correct answer it gives. ``train`` / ``test`` hold the observed sequences (step t = exercise t).
    """

    train: KTSequences
    test: KTSequences
    concept: Tensor
    difficulty: Tensor
    skill: Tensor
    prob: Tensor


@dataclasses.dataclass(frozen=True)
class Synthetic5:
    """The DKT paper's Synthetic-5 generator (see the module docstring).

    A student's initial skill in concept ``k`` is ``alpha_k = g + u_k``: a general ability
    ``g ~ N(ability_mean, ability_sd^2)`` and a deviation ``u_k ~ N(0, concept_sd^2)`` per concept.
    Difficulties ``beta ~ N(0, 1)``; each exercise's concept uniform over the concepts; a student's
    learning rate uniform in ``learn_rate``, added to the concept's skill after each exercise of that
    concept.

    The defaults were fitted to the first released Synthetic-5 data set of the DKT authors (item
    correct rates from its ``info`` file, 4,000 students; score spread and split-half correlation
    from 30 of its students). Simulated on its exercises: item-rate RMSE 0.013, score s.d. 9.0
    (theirs 9.1), odd/even-item correlation 0.78 (theirs 0.76). Concepts drawn independently
    (``ability_sd = 0``, ``concept_sd = 1``, learning in (0.05, 0.25)) gave 0.127, 4.3 and 0.36:
    students far less consistent than the paper's. ``benchmarks/synthetic5_fit.py`` reproduces
    these figures from local copies of the released files.
    """

    n_train: int = 2000
    n_test: int = 2000
    n_concepts: int = 5
    n_exercises: int = 50
    guess: float = 0.25
    learn_rate: tuple[float, float] = (0.0, 0.15)
    ability_mean: float = -0.6
    ability_sd: float = 1.5
    concept_sd: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        _need(
            self.n_train >= 1 and self.n_test >= 1,
            f"need >= 1 train and test student, got {self.n_train}, {self.n_test}",
        )
        _need(self.n_concepts >= 1, f"n_concepts must be >= 1, got {self.n_concepts}")
        _need(self.n_exercises >= 1, f"n_exercises must be >= 1, got {self.n_exercises}")
        _need(0.0 <= self.guess < 1.0, f"guess must lie in [0, 1), got {self.guess}")
        lo, hi = self.learn_rate
        _need(0.0 <= lo <= hi, f"learn_rate must be a range 0 <= low <= high, got {self.learn_rate}")
        _need(
            self.ability_sd >= 0.0 and self.concept_sd >= 0.0,
            f"ability_sd and concept_sd must be >= 0, got {self.ability_sd}, {self.concept_sd}",
        )

    def simulate(
        self, concept: Tensor, difficulty: Tensor, students: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``students`` students answering the exercises ``concept`` (E,) long / ``difficulty`` (E,)
        in order -> (skill, prob, responses), each (S, E): the skill in the exercise's concept
        before answering, the probability of a correct answer, the answer (long, 0/1). Concepts
        lie in ``[0, n_concepts)``."""
        s, e, k, g = students, len(concept), self.n_concepts, generator
        _need(
            concept.shape == difficulty.shape == (e,) and int(concept.min()) >= 0 and int(concept.max()) < k,
            f"concept and difficulty must be (E,), concepts in [0, {k}); got {tuple(concept.shape)}, "
            f"{tuple(difficulty.shape)}",
        )
        general = self.ability_mean + self.ability_sd * torch.randn(s, 1, generator=g, dtype=torch.float64)  # (S, 1)
        alpha0 = general + self.concept_sd * torch.randn(s, k, generator=g, dtype=torch.float64)  # (S, K)
        lo, hi = self.learn_rate
        rate = lo + (hi - lo) * torch.rand(s, generator=g, dtype=torch.float64)  # (S,)
        onehot = torch.nn.functional.one_hot(concept, k).double()  # (E, K)
        practice = torch.cumsum(onehot, dim=0) - onehot  # (E, K): earlier exercises of each concept
        skill = alpha0[:, None, :] + rate[:, None, None] * practice[None]  # (S, E, K)
        skill = skill.gather(2, concept[None, :, None].expand(s, e, 1)).squeeze(2)  # (S, E) the practised concept
        prob = self.guess + (1.0 - self.guess) * torch.sigmoid(skill - difficulty[None, :])  # (S, E)
        responses = (torch.rand(s, e, generator=g, dtype=torch.float64) < prob).long()  # (S, E)
        return skill, prob, responses

    def generate(self) -> SyntheticKT:
        g = torch.Generator().manual_seed(self.seed)
        s, e, k = self.n_train + self.n_test, self.n_exercises, self.n_concepts
        concept = torch.randint(0, k, (e,), generator=g)  # (E,)
        difficulty = torch.randn(e, generator=g, dtype=torch.float64)  # (E,)
        skill, prob, responses = self.simulate(concept, difficulty, s, g)
        questions = torch.arange(e).expand(s, e).clone()  # (S, E) every student answers exercise t at step t
        names = tuple(str(i) for i in range(e))

        def part(rows: slice) -> KTSequences:
            q, r = questions[rows], responses[rows]
            students = torch.arange(s)[rows]
            return KTSequences(q, r, torch.ones_like(q, dtype=torch.bool), students, names)

        return SyntheticKT(
            part(slice(0, self.n_train)), part(slice(self.n_train, s)), concept, difficulty, skill.float(), prob.float()
        )


_NA = {"", "na", "nan", "null", "none"}
_REQUIRED = ("order_id", "user_id", "skill_id", "correct")


def _sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # the public skill_builder_data.csv is Latin-1
        return raw.decode("latin-1")


def load_assistments(path: str | Path, max_length: int = 200, min_length: int = 2) -> KTSequences:
    """Sequences from an ASSISTments ``skill_builder_data.csv``-layout file (columns found by name).

    Rows without a skill id (empty / NA) are dropped; skill ids are mapped to contiguous question
    ids ``0 ..`` in increasing (numeric when they are numbers) order; each student's rows are
    ordered by ``order_id`` (ties keep file order) and cut into pieces of ``max_length``; pieces
    shorter than ``min_length`` are dropped. ``correct`` must be 0 or 1.
    """
    _need(max_length >= 1, f"max_length must be >= 1, got {max_length}")
    _need(1 <= min_length <= max_length, f"min_length must lie in [1, max_length], got {min_length}")
    file = Path(path)
    _need(file.is_file(), f"ASSISTments file {file} does not exist")
    reader = csv.DictReader(_open_text(file).splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in _REQUIRED if c not in header]
    _need(not missing, f"{file} lacks the columns {missing}; an ASSISTments CSV needs {list(_REQUIRED)}")
    reader.fieldnames = header
    per_student: dict[str, list[tuple[int, int, str, int]]] = {}
    for line, row in enumerate(reader, start=2):
        skill = (row["skill_id"] or "").strip()
        if skill.lower() in _NA:
            continue
        try:
            order = int(float(row["order_id"]))
            correct = float(row["correct"])
        except (TypeError, ValueError):
            raise InvalidInput(f"{file} line {line}: order_id and correct must be numbers, got {row!r}") from None
        _need(correct in (0.0, 1.0), f"{file} line {line}: correct must be 0 or 1, got {row['correct']!r}")
        user = (row["user_id"] or "").strip()
        per_student.setdefault(user, []).append((order, line, skill, int(correct)))
    _need(bool(per_student), f"{file} has no rows with a skill id")
    skills = sorted({r[2] for rows in per_student.values() for r in rows}, key=_sort_key)
    qid = {name: i for i, name in enumerate(skills)}
    pieces: list[tuple[int, list[tuple[int, int]]]] = []
    for student, user in enumerate(sorted(per_student, key=_sort_key)):
        rows = sorted(per_student[user])  # by order_id, then file line
        seq = [(qid[skill], correct) for _, _, skill, correct in rows]
        pieces.extend((student, seq[i : i + max_length]) for i in range(0, len(seq), max_length))
    pieces = [(s, p) for s, p in pieces if len(p) >= min_length]
    _need(bool(pieces), f"{file}: no student has a sequence of at least min_length = {min_length} interactions")
    return _padded(pieces, tuple(skills))


def load_three_line(path: str | Path, max_length: int = 200, min_length: int = 2) -> KTSequences:
    """Sequences from a file in the three-line layout of the DKVMN release and pykt (``assist2009``,
    ``synthetic``, ...): per student a line with the number of interactions ``L``, a line of ``L``
    comma-separated question ids (1-based), a line of ``L`` responses (0 or 1); trailing commas and
    blank lines are allowed. Question ids keep their numbers (id ``k`` -> question ``k - 1``; the
    number of questions is the largest id), so a training and a test file agree; a student's
    history is cut into pieces of ``max_length``, pieces shorter than ``min_length`` dropped.
    """
    _need(max_length >= 1, f"max_length must be >= 1, got {max_length}")
    _need(1 <= min_length <= max_length, f"min_length must lie in [1, max_length], got {min_length}")
    file = Path(path)
    _need(file.is_file(), f"knowledge-tracing file {file} does not exist")
    lines = [line.strip().rstrip(",") for line in _open_text(file).splitlines()]
    lines = [line for line in lines if line]
    _need(
        len(lines) % 3 == 0 and bool(lines),
        f"{file}: {len(lines)} non-empty lines; the three-line layout has a multiple of 3 (length, questions, answers)",
    )
    pieces: list[tuple[int, list[tuple[int, int]]]] = []
    top = 0
    for student in range(len(lines) // 3):
        at = 3 * student + 1  # 1-based line number of the length line (blank lines aside)
        try:
            length = int(lines[3 * student])
            qs = [int(x) for x in lines[3 * student + 1].split(",")]
            rs = [int(float(x)) for x in lines[3 * student + 2].split(",")]
        except ValueError:
            raise InvalidInput(f"{file}: student {student} (record line {at}) has a non-number field") from None
        _need(
            len(qs) == len(rs) == length,
            f"{file}: student {student} (record line {at}) says {length} interactions but lists "
            f"{len(qs)} questions and {len(rs)} answers",
        )
        _need(min(qs, default=1) >= 1, f"{file}: student {student}: question ids start at 1")
        _need(set(rs) <= {0, 1}, f"{file}: student {student}: answers must be 0 or 1")
        top = max(top, max(qs, default=0))
        seq = [(q - 1, r) for q, r in zip(qs, rs, strict=True)]
        pieces.extend((student, seq[i : i + max_length]) for i in range(0, len(seq), max_length))
    pieces = [(s, p) for s, p in pieces if len(p) >= min_length]
    _need(bool(pieces), f"{file}: no student has a sequence of at least min_length = {min_length} interactions")
    return _padded(pieces, tuple(str(i + 1) for i in range(top)))


def _padded(pieces: list[tuple[int, list[tuple[int, int]]]], names: tuple[str, ...]) -> KTSequences:
    """:class:`KTSequences` of ``(student, [(question, response), ...])`` pieces, padded at the end."""
    t = max(len(p) for _, p in pieces)
    questions = torch.zeros(len(pieces), t, dtype=torch.long)
    responses = torch.zeros(len(pieces), t, dtype=torch.long)
    mask = torch.zeros(len(pieces), t, dtype=torch.bool)
    for i, (_, p) in enumerate(pieces):
        questions[i, : len(p)] = torch.tensor([q for q, _ in p])
        responses[i, : len(p)] = torch.tensor([r for _, r in p])
        mask[i, : len(p)] = True
    students = torch.tensor([s for s, _ in pieces], dtype=torch.long)
    return KTSequences(questions, responses, mask, students, names)


def auc(scores: Any, labels: Any) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (same length; tensors, arrays or sequences).

    By ranks: ``(sum of the positives' ranks - P (P + 1) / 2) / (P N)``, tied scores sharing their
    average rank, which equals the probability that a random positive outscores a random negative,
    ties counting one half. Needs at least one positive and one negative.
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels, dtype=np.float64).ravel()
    _need(s.shape == y.shape, f"scores and labels must have the same length, got {s.shape[0]} and {y.shape[0]}")
    _need(bool(np.isfinite(s).all()), "scores must be finite (no NaN or inf)")
    _need(bool(np.isin(y, (0.0, 1.0)).all()), "labels must be 0 or 1")
    pos = int(y.sum())
    neg = y.shape[0] - pos
    _need(pos > 0 and neg > 0, f"the AUC needs both classes; got {pos} positives and {neg} negatives")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    before = np.cumsum(counts) - counts  # scores strictly below each distinct value
    ranks = (before + (counts + 1) / 2.0)[inverse]  # 1-based average rank of each score
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
