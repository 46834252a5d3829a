"""Knowledge tracing: Synthetic-5 against its IRT model, the ASSISTments loader, the rank AUC."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memfusion.bench.tasks.tracing import (
    KTSequences,
    Synthetic5,
    SyntheticKT,
    auc,
    load_assistments,
    load_three_line,
)
from memfusion.errors import InvalidInput

FIXTURE = Path(__file__).parent / "fixtures" / "assistments_tiny.csv"


@pytest.fixture(scope="module")
def synth() -> SyntheticKT:
    return Synthetic5().generate()


def test_synthetic5_shapes(synth: SyntheticKT) -> None:
    for part in (synth.train, synth.test):
        assert part.questions.shape == part.responses.shape == part.mask.shape == (2000, 50)
        assert part.n_questions == 50 and bool(part.mask.all())
        assert torch.equal(part.questions, torch.arange(50).expand(2000, 50)), "everyone answers the same 50 in order"
        assert set(part.responses.unique().tolist()) == {0, 1}
    assert synth.train.students.tolist() == list(range(2000)) and synth.test.students.tolist() == list(
        range(2000, 4000)
    )
    assert synth.concept.shape == (50,) and set(synth.concept.tolist()) == set(range(5))
    assert synth.skill.shape == synth.prob.shape == (4000, 50)


def test_synthetic5_is_seeded(synth: SyntheticKT) -> None:
    again = Synthetic5().generate()
    assert torch.equal(again.train.responses, synth.train.responses) and torch.equal(again.concept, synth.concept)
    other = Synthetic5(seed=1).generate()
    assert not torch.equal(other.train.responses, synth.train.responses)
    small = Synthetic5(n_train=30, n_test=20, n_concepts=3, n_exercises=12).generate()
    assert small.train.questions.shape == (30, 12) and small.test.questions.shape == (20, 12)


def test_probabilities_follow_irt_with_guessing(synth: SyntheticKT) -> None:
    alpha = synth.skill.double().numpy()
    beta = synth.difficulty.double().numpy()[None, :]
    c = 0.25
    expected = c + (1 - c) / (1 + np.exp(beta - alpha))
    np.testing.assert_allclose(synth.prob.double().numpy(), expected, atol=1e-6)
    assert synth.prob.min() > 0.25


def test_empirical_correct_rate_matches_the_model(synth: SyntheticKT) -> None:
    """Law of large numbers: overall and per probability decile, within 4 standard errors."""
    y = torch.cat([synth.train.responses, synth.test.responses]).double().numpy().ravel()
    p = synth.prob.double().numpy().ravel()
    se = math.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(y.mean() - p.mean()) < 4 * se
    edges = np.quantile(p, np.linspace(0, 1, 11))
    for lo, hi in itertools.pairwise(edges):
        sel = (p >= lo) & (p < hi)
        se = math.sqrt((p[sel] * (1 - p[sel])).sum()) / sel.sum()
        assert abs(y[sel].mean() - p[sel].mean()) < 4 * se


def test_initial_skills_share_a_general_ability(synth: SyntheticKT) -> None:
    # alpha_k = g + u_k: two concepts' initial skills correlate by sd_g^2 / (sd_g^2 + sd_u^2) = 0.5
    # (defaults 1.5, 1.5); with no general ability they are independent
    def initial_skills(data: SyntheticKT) -> np.ndarray:
        concept = data.concept.tolist()
        return data.skill.double().numpy()[:, [concept.index(k) for k in range(5)]]  # (S, 5) before any practice

    corr = np.corrcoef(initial_skills(synth).T)[np.triu_indices(5, 1)]
    assert np.all(np.abs(corr - 0.5) < 0.06), corr
    alone = initial_skills(Synthetic5(ability_sd=0.0, concept_sd=1.0).generate())
    assert np.all(np.abs(np.corrcoef(alone.T)[np.triu_indices(5, 1)]) < 0.06)
    assert abs(alone.std() - 1.0) < 0.05 and abs(alone.mean() + 0.6) < 0.05


def test_skills_increase_with_practice(synth: SyntheticKT) -> None:
    concept = synth.concept.tolist()
    skill = synth.skill.double().numpy()
    rates = []
    for s in range(0, 4000, 37):  # a spread of students, checked by a plain loop
        last: dict[int, float] = {}
        steps: list[float] = []
        for t, k in enumerate(concept):
            if k in last:
                steps.append(skill[s, t] - last[k])
                assert skill[s, t] > last[k]
            last[k] = skill[s, t]
        assert max(steps) - min(steps) < 1e-5, "one learning rate per student"
        rates.append(steps[0])
    assert min(rates) >= 0.0 and max(rates) <= 0.15 and max(rates) - min(rates) > 0.1
    # and so the later exercises of a concept are answered correctly more often than under the initial skill
    beta = synth.difficulty.double().numpy()
    first = {k: concept.index(k) for k in set(concept)}
    initial = skill[:, [first[k] for k in concept]]  # each student's initial skill in each exercise's concept
    p_initial = 0.25 + 0.75 / (1 + np.exp(beta[None, :] - initial))
    assert synth.prob.double().numpy().mean() > p_initial.mean() + 0.02


# ---------------------------------------------------------------- three-line layout (DKVMN release, pykt)

THREE_LINE = FIXTURE.with_name("three_line_tiny.csv")


def test_three_line_loader_on_the_fixture() -> None:
    seqs = load_three_line(THREE_LINE)
    # hand-read from the fixture: ids keep their numbers (k -> k - 1; 7 questions, the largest id);
    # the one-interaction student 2 is dropped (min_length 2); a blank line between records is allowed
    assert seqs.n_questions == 7 and seqs.question_names == ("1", "2", "3", "4", "5", "6", "7")
    assert seqs.students.tolist() == [0, 1, 3]
    assert seqs.questions.tolist() == [[0, 1, 2, 3, 4], [1, 1, 6, 0, 0], [4, 0, 0, 2, 0]]
    assert seqs.responses.tolist() == [[1, 0, 1, 1, 0], [0, 1, 1, 0, 0], [1, 1, 0, 1, 0]]
    assert seqs.mask.sum(1).tolist() == [5, 3, 4]
    cut = load_three_line(THREE_LINE, max_length=2, min_length=1)
    assert cut.students.tolist() == [0, 0, 0, 1, 1, 2, 3, 3] and cut.mask.sum(1).tolist() == [2, 2, 1, 2, 1, 1, 2, 2]


def test_three_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_three_line(tmp_path / "none.csv")
    cases = {
        "3\n1,2,3\n": "multiple of 3",
        "3\n1,2\n1,0\n": "says 3 interactions but lists 2 questions",
        "2\n1,x\n1,0\n": "non-number",
        "2\n0,1\n1,0\n": "start at 1",
        "2\n1,2\n1,2\n": "0 or 1",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(InvalidInput, match=message):
            load_three_line(bad)


# ---------------------------------------------------------------- ASSISTments


def test_assistments_fixture_has_the_public_header() -> None:
    with FIXTURE.open() as f:
        header = next(csv.reader(f))
    assert header[:7] == ["order_id", "assignment_id", "user_id", "assistment_id", "problem_id", "original", "correct"]
    assert {"skill_id", "skill_name"} <= set(header) and len(header) == 30


def test_assistments_loader_on_the_fixture() -> None:
    seqs = load_assistments(FIXTURE)
    # hand-derived from the fixture: skills 10, 13, 47 -> 0, 1, 2; rows without a skill dropped;
    # user 70677 keeps one interaction (< min_length 2) and is dropped; order_id ties keep file order
    assert seqs.question_names == ("10", "13", "47") and seqs.n_questions == 3
    expect = {
        0: ([0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 1, 1]),  # user 64525
        1: ([0, 0, 0, 2, 2, 2, 2, 1, 2], [0, 1, 1, 0, 0, 1, 1, 1, 1]),  # user 70363
        3: ([1, 1, 1, 0, 0, 0, 2, 2], [0, 0, 1, 1, 0, 1, 1, 1]),  # user 78150
        4: ([0, 1, 0], [0, 1, 1]),  # user 79032
    }
    assert seqs.students.tolist() == [0, 1, 3, 4]
    assert seqs.questions.shape == (4, 9)
    for row, student in enumerate(seqs.students.tolist()):
        n = len(expect[student][0])
        assert seqs.mask[row].tolist() == [True] * n + [False] * (9 - n)
        assert seqs.questions[row, :n].tolist() == expect[student][0]
        assert seqs.responses[row, :n].tolist() == expect[student][1]
        assert seqs.questions[row, n:].sum() == 0 and seqs.responses[row, n:].sum() == 0
        assert seqs.one_based()[row].tolist() == [q + 1 for q in expect[student][0]] + [0] * (9 - n)


def test_assistments_sequences_are_cut_to_max_length() -> None:
    seqs = load_assistments(FIXTURE, max_length=4)
    lengths = seqs.mask.sum(1).tolist()
    # 64525: 6 -> 4 + 2; 70363: 9 -> 4 + 4 (+ 1, dropped); 78150: 8 -> 4 + 4; 79032: 3
    assert seqs.students.tolist() == [0, 0, 1, 1, 3, 3, 4] and lengths == [4, 2, 4, 4, 4, 4, 3]
    assert seqs.questions[1, :2].tolist() == [1, 1] and seqs.questions[3].tolist() == [2, 2, 2, 1]
    assert len(load_assistments(FIXTURE, max_length=4, min_length=1)) == 9


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_assistments_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_assistments(tmp_path / "none.csv")
    bad = write_csv(tmp_path / "a.csv", ["order_id", "user_id", "correct"], [["1", "2", "1"]])
    with pytest.raises(InvalidInput, match=r"lacks the columns \['skill_id'\]"):
        load_assistments(bad)
    bad = write_csv(tmp_path / "b.csv", ["order_id", "user_id", "skill_id", "correct"], [["1", "2", "5", "2"]])
    with pytest.raises(InvalidInput, match="line 2: correct must be 0 or 1"):
        load_assistments(bad)
    bad = write_csv(tmp_path / "c.csv", ["order_id", "user_id", "skill_id", "correct"], [["1", "2", "", "1"]])
    with pytest.raises(InvalidInput, match="no rows with a skill"):
        load_assistments(bad)
    bad = write_csv(tmp_path / "d.csv", ["order_id", "user_id", "skill_id", "correct"], [["x", "2", "5", "1"]])
    with pytest.raises(InvalidInput, match="must be numbers"):
        load_assistments(bad)
    with pytest.raises(InvalidInput, match="min_length"):
        load_assistments(FIXTURE, min_length=10)
    with pytest.raises(InvalidInput, match="max_length"):
        load_assistments(FIXTURE, max_length=0)


def test_latin1_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    text = "order_id,user_id,skill_id,skill_name,correct\n1,7,3,Équations,1\n2,7,3,Équations,0\n"
    path.write_bytes(text.encode("latin-1"))
    seqs = load_assistments(path)
    assert seqs.responses.tolist() == [[1, 0]] and seqs.question_names == ("3",)


def test_batches_and_split_by_student() -> None:
    seqs = load_assistments(FIXTURE, max_length=4)
    seen = [int(s) for batch in seqs.batches(3, torch.Generator().manual_seed(0)) for s in batch.students]
    assert sorted(seen) == sorted(seqs.students.tolist())
    first = next(iter(seqs.batches(3)))
    assert first.students.tolist() == [0, 0, 1] and first.questions.shape == (3, 4)
    train, test = seqs.split_by_student(0.25, seed=0)
    assert not set(train.students.tolist()) & set(test.students.tolist())
    assert len(train) + len(test) == len(seqs) and len(set(test.students.tolist())) == 1
    with pytest.raises(InvalidInput, match="test_fraction"):
        seqs.split_by_student(1.0)


# ---------------------------------------------------------------- AUC


def brute_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_pair_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=80).astype(float).tolist()  # many ties
    labels = rng.integers(0, 2, size=80).tolist()
    assert auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)
    cont = rng.random(50).tolist()
    lab = (rng.random(50) < 0.3).astype(int).tolist()
    assert auc(torch.tensor(cont), torch.tensor(lab)) == pytest.approx(brute_auc(cont, lab), abs=1e-12)


def test_auc_known_values() -> None:
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_auc_bad_input() -> None:
    with pytest.raises(InvalidInput, match="both classes"):
        auc([0.1, 0.2], [1, 1])
    with pytest.raises(InvalidInput, match="same length"):
        auc([0.1, 0.2], [1])
    with pytest.raises(InvalidInput, match="finite"):
        auc([float("nan"), 0.2], [0, 1])
    with pytest.raises(InvalidInput, match="0 or 1"):
        auc([0.1, 0.2], [0, 2])


def test_synthetic5_bad_input() -> None:
    with pytest.raises(InvalidInput, match="train and test"):
        Synthetic5(n_train=0)
    with pytest.raises(InvalidInput, match="guess"):
        Synthetic5(guess=1.0)
    with pytest.raises(InvalidInput, match="learn_rate"):
        Synthetic5(learn_rate=(0.3, 0.1))
    with pytest.raises(InvalidInput, match="ability_sd"):
        Synthetic5(ability_sd=-1.0)
    with pytest.raises(InvalidInput, match=r"concepts in \[0, 5\)"):
        Synthetic5().simulate(torch.tensor([0, 5]), torch.zeros(2, dtype=torch.float64), 3, torch.Generator())
    with pytest.raises(InvalidInput, match=r"questions, responses, mask must be \(N, T\)"):
        KTSequences(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2), ("a",))
