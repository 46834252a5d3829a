"""Training examples for the reference model, made by the long-context task generators.

One example, in the ids of the tokenizer passed in::

    input_ids = tokenizer(sample.prompt).input_ids                        # <s> ... question ... <v>
              + tokenizer(" " + sample.target, add_special_tokens=False).input_ids
              + [tokenizer.eos_token_id]
    loss_mask = [0] * len(prompt ids) + [1] * (len(answer ids) + 1)

The loss covers the answer and the closing eos only (what worked in the quick trial: a model learns
to answer after ``<v>`` and to stop). The prompt is encoded exactly as at evaluation time, so a
trained model sees the same ids when the benchmark asks it. ``labels()`` / :func:`collate` give
the Hugging Face convention (the input id where the mask is 1, -100 elsewhere; the causal LM
shifts them itself).

Keys and values are drawn from ``(task, seed, sample index)``: train with other seeds than the
benchmark's (small ones, 0 by default); :data:`TRAINING_SEED` is the default here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from memfusion.bench.tasks import get_task
from memfusion.bench.tasks.longcontext import LongContextTask, Sample
from memfusion.errors import InvalidInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TRAINING_SEED = 10_000
"""The default seed of :func:`training_examples`, far from the benchmark's."""
IGNORE = -100
"""The label outside the answer (``torch.nn.functional.cross_entropy``'s ignore index)."""


@dataclass(frozen=True)
class TrainingExample:
    """Token ids and the loss mask. Invariants: same length; the mask is 0 on a non-empty prompt
    and 1 on a non-empty answer that ends the sequence."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    task: str
    length: int

    def __post_init__(self) -> None:
        n_answer = sum(self.loss_mask)
        if (
            len(self.input_ids) != len(self.loss_mask)
            or n_answer == 0
            or n_answer == len(self.loss_mask)
            or any(self.loss_mask[:-n_answer])
            or not all(self.loss_mask[-n_answer:])
        ):
            raise InvalidInput("a TrainingExample is a prompt (mask 0) followed by an answer (mask 1) of equal lengths")

    @property
    def n_answer(self) -> int:
        """Tokens under the loss (the answer and eos)."""
        return sum(self.loss_mask)

    def labels(self) -> list[int]:
        return [t if m else IGNORE for t, m in zip(self.input_ids, self.loss_mask, strict=True)]


def training_example(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> TrainingExample:
    """The example of one sample (format in the module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidInput("the tokenizer has no eos token; training examples end every answer with it")
    prompt = list(tokenizer(sample.prompt)["input_ids"])
    answer = [*tokenizer(" " + sample.target, add_special_tokens=False)["input_ids"], int(eos)]
    return TrainingExample(tuple(prompt + answer), (0,) * len(prompt) + (1,) * len(answer), sample.task, sample.length)


def training_examples(
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str | LongContextTask],
    lengths: Sequence[int],
    n: int,
    seed: int = TRAINING_SEED,
) -> list[TrainingExample]:
    """``n`` examples of every task at every length (task-major, then length, then sample), the
    needle depths spread over [0, 1]. A length too short for a task raises :class:`InvalidInput`;
    shuffle the result for training."""
    if not tasks or not lengths:
        raise InvalidInput("training_examples needs at least one task and one length")
    out: list[TrainingExample] = []
    for task in tasks:
        t = get_task(task) if isinstance(task, str) else task
        for length in lengths:
            out += [training_example(tokenizer, s) for s in t.generate(tokenizer, length, n, seed=seed)]
    return out


def collate(examples: Sequence[TrainingExample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: ``input_ids`` (B, T) long (``pad_id`` after each row), ``labels`` (B, T)
    long (-100 on prompt and padding), ``attention_mask`` (B, T) long (1 on real tokens)."""
    if not examples:
        raise InvalidInput("collate needs at least one example")
    t = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), t), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(examples), t), dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[row, :k] = torch.tensor(e.input_ids)
        labels[row, :k] = torch.tensor(e.labels())
        attention[row, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def random_position_ids(batch: int, seq_len: int, max_position: int, generator: torch.Generator) -> Tensor:
    """Randomised positions (Ruoss et al. 2023): per row, a sorted random subset of ``seq_len``
    distinct positions of ``[0, max_position)``, (B, T) long. Training on short sequences with
    them shows a RoPE model the relative distances of a ``max_position``-long context."""
    if batch < 1 or seq_len < 1 or max_position < seq_len:
        raise InvalidInput(f"need batch >= 1 and 1 <= seq_len <= max_position, got {batch}, {seq_len}, {max_position}")
    scores = torch.rand((batch, max_position), generator=generator)  # (B, P)
    return scores.argsort(dim=1)[:, :seq_len].sort(dim=1).values  # (B, T)
