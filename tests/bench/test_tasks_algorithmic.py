"""The NTM algorithmic tasks, checked against a per-row Python decoding of their own inputs."""

from __future__ import annotations

import math

import pytest
import torch

from memfusion.bench.tasks.algorithmic import (
    ALGORITHMIC,
    AssociativeRecall,
    Copy,
    PrioritySort,
    RepeatCopy,
    SeqBatch,
    algorithmic_task,
    bce_loss,
    bit_errors,
    sequence_accuracy,
)
from memfusion.errors import InvalidInput

SEEDS = [0, 1, 2]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(x: torch.Tensor) -> list[list[list[float]]]:
    return x.tolist()


def flat(x: torch.Tensor) -> list[float]:
    return x.flatten().tolist()


def answer_span(mask_row: torch.Tensor) -> tuple[int, int]:
    """(first, end) of the single run of ones in a mask row; also checks it is one contiguous run."""
    on = torch.nonzero(mask_row).flatten().tolist()
    assert on == list(range(on[0], on[-1] + 1)), "the answer phase must be contiguous"
    return on[0], on[-1] + 1


@pytest.mark.parametrize("seed", SEEDS)
def test_copy_targets_are_the_inputs(seed: int) -> None:
    task = Copy(width=5, min_length=1, max_length=9)
    b = task.batch(16, gen(seed))
    w = task.width
    for r in range(16):
        x, y, m = b.inputs[r], b.targets[r], b.mask[r]
        delim = [t for t in range(b.steps) if x[t, w] == 1.0]
        assert len(delim) == 1
        length = delim[0]
        assert 1 <= length <= 9
        data = rows(x[:length, :w])
        assert all(v in (0.0, 1.0) for vec in data for v in vec)
        assert rows(y[length + 1 : 2 * length + 1]) == data
        assert answer_span(m) == (length + 1, 2 * length + 1)
        assert float(x[length + 1 :].abs().sum()) == 0.0  # nothing is shown during the answer and the padding
        assert float(y[: length + 1].abs().sum()) == 0.0 and float(y[2 * length + 1 :].abs().sum()) == 0.0
    assert b.steps == 2 * int(b.mask.sum(1).max()) + 1


@pytest.mark.parametrize("seed", SEEDS)
def test_repeat_copy_repeats_the_stated_number_of_times(seed: int) -> None:
    task = RepeatCopy(width=4, min_length=1, max_length=5, min_repeats=1, max_repeats=4, repeat_norm=4.0)
    b = task.batch(16, gen(seed))
    w = task.width
    seen_repeats = set()
    for r in range(16):
        x, y, m = b.inputs[r], b.targets[r], b.mask[r]
        length = next(t for t in range(b.steps) if x[t, w] == 1.0)
        n = x[length + 1, w + 1].item() * 4.0
        assert n == round(n) and 1 <= n <= 4
        n = round(n)
        seen_repeats.add(n)
        data = rows(x[:length, :w])
        expected = [[*vec, 0.0] for _ in range(n) for vec in data] + [[0.0] * w + [1.0]]
        start = length + 2
        assert rows(y[start : start + n * length + 1]) == expected
        assert answer_span(m) == (start, start + n * length + 1)
        assert float(y.sum()) == sum(map(sum, expected))  # nothing else in the targets
    assert len(seen_repeats) > 1


def decode_recall(x: torch.Tensor, w: int, n: int) -> tuple[list[list[float]], list[float], int]:
    """Walk the input stream: the items, the query and the time the answer starts."""
    items: list[list[float]] = []
    t = 0
    while x[t, w] == 1.0:
        items.append(flat(x[t + 1 : t + 1 + n, :w]))
        t += n + 1
    assert x[t, w + 1] == 1.0 and x[t + n + 1, w + 1] == 1.0
    query = flat(x[t + 1 : t + 1 + n, :w])
    return items, query, t + n + 2


@pytest.mark.parametrize("seed", SEEDS)
def test_associative_recall_answers_the_item_after_the_query(seed: int) -> None:
    task = AssociativeRecall(width=3, item_len=2, min_length=2, max_length=6)
    b = task.batch(32, gen(seed))
    for r in range(32):
        items, query, start = decode_recall(b.inputs[r], 3, 2)
        assert 2 <= len(items) <= 6
        assert len({tuple(i) for i in items}) == len(items), "items of a row are distinct"
        hits = [i for i in range(len(items)) if items[i] == query]  # brute-force search
        assert len(hits) == 1 and hits[0] < len(items) - 1
        answer = flat(b.targets[r, start : start + 2])
        assert answer == items[hits[0] + 1]
        assert answer_span(b.mask[r]) == (start, start + 2)


def test_associative_recall_items_stay_distinct_when_collisions_are_likely() -> None:
    # 4 bits per item, 6 items: a fresh draw collides often, so the redraw path runs
    task = AssociativeRecall(width=2, item_len=2, min_length=6, max_length=6)
    b = task.batch(64, gen(0))
    for r in range(64):
        items, _, _ = decode_recall(b.inputs[r], 2, 2)
        assert len({tuple(i) for i in items}) == 6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keep", [16, None, 3])
def test_priority_sort_output_is_sorted_by_priority(seed: int, keep: int | None) -> None:
    task = PrioritySort(width=4, min_length=1, max_length=20, keep=keep)
    b = task.batch(16, gen(seed))
    for r in range(16):
        x = b.inputs[r]
        length = next(t for t in range(b.steps) if x[t, 5] == 1.0)
        pairs = [(x[t, 4].item(), rows(x[t, :4])) for t in range(length)]
        assert all(-1.0 <= p <= 1.0 for p, _ in pairs)
        count = length if keep is None else min(keep, length)
        expected = [vec for _, vec in sorted(pairs, key=lambda pv: -pv[0])][:count]
        assert rows(b.targets[r, length + 1 : length + 1 + count]) == expected
        assert answer_span(b.mask[r]) == (length + 1, length + 1 + count)


@pytest.mark.parametrize("name", sorted(ALGORITHMIC))
def test_sizes_padding_and_masks_agree(name: str) -> None:
    task = algorithmic_task(name)
    b = task.batch(8, gen(3))
    assert b.inputs.shape[-1] == task.input_size and b.targets.shape[-1] == task.output_size
    assert b.inputs.dtype == b.targets.dtype == b.mask.dtype == torch.float32
    assert set(b.mask.unique().tolist()) <= {0.0, 1.0}
    assert float((b.targets * (1 - b.mask)[..., None]).abs().sum()) == 0.0, "targets are 0 off the mask"
    # the longest row reaches the last step; every row ends with its answer (only padding after)
    last = [int(torch.nonzero(b.mask[r]).max()) for r in range(8)]
    assert max(last) == b.steps - 1
    for r in range(8):
        assert float(b.inputs[r, last[r] + 1 :].abs().sum()) == 0.0


def test_variable_lengths_within_a_batch() -> None:
    b = Copy(min_length=1, max_length=20).batch(32, gen(0))
    lengths = b.mask.sum(1)
    assert len(lengths.unique()) > 5
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= 20


@pytest.mark.parametrize("name", sorted(ALGORITHMIC))
def test_length_override_generalisation(name: str) -> None:
    task = algorithmic_task(name)
    b = task.batch(4, gen(0), length=task.max_length + 7)
    if name == "copy":
        assert b.steps == 2 * (task.max_length + 7) + 1 and b.mask.sum(1).tolist() == [task.max_length + 7] * 4
    if name == "associative_recall":
        items, _, _ = decode_recall(b.inputs[0], task.input_size - 2, 3)
        assert len(items) == task.max_length + 7
    if name == "priority_sort":
        assert b.mask.sum(1).tolist() == [16.0] * 4 and b.steps == task.max_length + 7 + 1 + 16


def test_copy_train_one_to_twenty_test_forty() -> None:
    task = Copy()  # the defaults are the paper's: 8 bits, lengths 1-20
    assert (task.width, task.min_length, task.max_length) == (8, 1, 20)
    b = task.batch(2, gen(0), length=40)
    assert b.steps == 81 and b.mask.sum().item() == 80
    assert rows(b.targets[0, 41:81]) == rows(b.inputs[0, :40, :8])


@pytest.mark.parametrize("name", sorted(ALGORITHMIC))
def test_determinism(name: str) -> None:
    task = algorithmic_task(name)
    a, b, c = task.batch(8, gen(5)), task.batch(8, gen(5)), task.batch(8, gen(6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask)
    assert a.inputs.shape != c.inputs.shape or not torch.equal(a.inputs, c.inputs)


def tiny_batch() -> SeqBatch:
    targets = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])  # (2, 3, 2)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    return SeqBatch(torch.zeros(2, 3, 1), targets, mask)


def test_bit_errors_and_sequence_accuracy_on_a_hand_computed_case() -> None:
    b = tiny_batch()
    logits = torch.tensor(
        [
            # row 0: step 0 is not scored (wrong on purpose), step 1 right, step 2 has one wrong bit
            [[5.0, 5.0], [2.0, -1.0], [3.0, 4.0]],
            # row 1: step 1 right; step 2 is padding (wrong on purpose, not scored)
            [[9.0, 9.0], [0.5, 0.1], [1.0, 1.0]],
        ]
    )
    assert bit_errors(logits, b).tolist() == [1, 0]
    assert sequence_accuracy(logits, b) == 0.5
    # a logit of exactly 0 predicts 0
    assert bit_errors(torch.zeros(2, 3, 2), b).tolist() == [2, 2]
    perfect = b.targets * 20 - 10
    assert bit_errors(perfect, b).tolist() == [0, 0] and sequence_accuracy(perfect, b) == 1.0


def test_bce_loss_matches_the_formula() -> None:
    b = tiny_batch()
    logits = torch.tensor([[[0.0, 0.0], [1.0, -2.0], [0.5, 0.5]], [[0.0, 0.0], [-1.0, 3.0], [7.0, 7.0]]])

    def bce(z: float, y: float) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    scored = [(0, 1), (0, 2), (1, 1)]
    terms = [bce(logits[r, t, o].item(), b.targets[r, t, o].item()) for r, t in scored for o in range(2)]
    assert bce_loss(logits, b).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_bad_input() -> None:
    g = gen(0)
    with pytest.raises(InvalidInput, match="batch_size"):
        Copy().batch(0, g)
    with pytest.raises(InvalidInput, match="length"):
        Copy().batch(2, g, length=0)
    with pytest.raises(InvalidInput, match="length"):
        AssociativeRecall().batch(2, g, length=1)
    with pytest.raises(InvalidInput, match="min_length"):
        Copy(min_length=0)
    with pytest.raises(InvalidInput, match="min_length"):
        PrioritySort(min_length=5, max_length=4)
    with pytest.raises(InvalidInput, match="width"):
        Copy(width=0)
    with pytest.raises(InvalidInput, match="repeats"):
        RepeatCopy(min_repeats=0)
    with pytest.raises(InvalidInput, match="keep"):
        PrioritySort(keep=0)
    with pytest.raises(InvalidInput, match="distinct items"):
        AssociativeRecall(width=1, item_len=1, max_length=3)
    with pytest.raises(InvalidInput, match="unknown algorithmic task 'sort'"):
        algorithmic_task("sort")
    with pytest.raises(InvalidInput, match="bad parameters"):
        algorithmic_task("copy", widht=3)
    with pytest.raises(InvalidInput, match="shape"):
        bit_errors(torch.zeros(2, 3, 3), tiny_batch())
    with pytest.raises(InvalidInput, match="SeqBatch"):
        SeqBatch(torch.zeros(2, 3, 1), torch.zeros(2, 4, 1), torch.zeros(2, 3))
