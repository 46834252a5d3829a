"""Sequence recipes: NTM, DNC and the LSTM baseline on the NTM paper's algorithmic tasks and the DNC paper's
graph tasks.

Training draws fresh random sequences every step (lengths uniform in the training range, or a
curriculum that widens the range linearly over the first ``curriculum`` steps). The loss is the
task's: binary cross-entropy on the answer bits (algorithmic) or cross-entropy per one-hot group
(graphs). Evaluation uses fixed sets drawn once from the run's evaluation stream: ``eval_size``
sequences with lengths drawn from the training range, and ``eval_size`` sequences at each length of
``eval_lengths`` (generalisation, e.g. copy at length 40). Metrics (``@L`` = at length L):

- algorithmic: ``bit_errors`` (mean wrong answer bits per sequence) and ``seq_accuracy`` (sequences
  with no wrong bit), then ``bit_errors@L`` / ``seq_accuracy@L``;
- graphs: ``step_accuracy`` (answer steps whose every one-hot group is right) and ``seq_accuracy``
  (sequences whose every answer step is right), then ``step_accuracy@L`` / ``seq_accuracy@L``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from memfusion.bench.recipes.base import eval_generator, need
from memfusion.bench.recipes.baselines import LSTMBaseline, LSTMConfig
from memfusion.bench.tasks import algorithmic, graphs
from memfusion.bench.tasks.algorithmic import ALGORITHMIC, AlgorithmicTask, SeqBatch
from memfusion.bench.tasks.graphs import GRAPH_TASKS, GraphBatch, GraphTask
from memfusion.bench.train import Problem
from memfusion.neural.dnc import DNC, DNCConfig
from memfusion.neural.ntm import NTM, NTMConfig


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
    """Model sizes and the task's length range.

    hidden_size: the NTM / DNC controller's LSTM units, or the LSTM baseline's width; layers: the
    LSTM baseline's depth (ignored by the memories); memory_slots ``N``, memory_width ``M`` and
    read_heads (NTM / DNC). min_length / max_length: the training range of the task's size knob
    (sequence length, items, vectors, hops for graphs; None: the task's default); curriculum: grow
    the range's top linearly from min_length to max_length over this many steps (0: no curriculum);
    eval_lengths: the extra lengths scored; eval_size: sequences per evaluation set.

    random_memory (NTM only): start from a random memory, uniform in ``±1/sqrt(N + M)`` (as
    pytorch-ntm), instead of the NTM's constant 1e-6. With a constant memory and uniform initial
    weightings every slot is interchangeable: content addressing, shifts and sharpening keep the
    weightings uniform and the gradients are the same for every slot, so the heads can never focus
    on one slot and the NTM degenerates into an LSTM with one averaged memory row. A random
    initial memory breaks that symmetry from the first step. focused_start (NTM only): the learned
    initial read and write weightings start focused on slot 0 (logit ``FOCUS_LOGIT`` there, 0
    elsewhere: 99% of the weight with 128 slots) instead of uniform, so a head can walk the memory
    by shifts from the first step.
    """

    hidden_size: int = 100
    layers: int = 1
    memory_slots: int = 128
    memory_width: int = 20
    read_heads: int = 1
    min_length: int | None = None
    max_length: int | None = None
    curriculum: int = 0
    eval_lengths: tuple[int, ...] = ()
    eval_size: int = 256
    random_memory: bool = True
    focused_start: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "memory_slots", "memory_width", "read_heads", "eval_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"option {name} must be an integer >= 1, got {v!r}")
        for name in ("min_length", "max_length"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"option {name} must be >= 1 or none (the task's default), got {v!r}")
        need(self.curriculum >= 0, f"option curriculum must be >= 0 steps (0: off), got {self.curriculum}")
        need(all(n >= 1 for n in self.eval_lengths), f"option eval_lengths must be >= 1, got {self.eval_lengths}")


FOCUS_LOGIT = 10.0
"""The initial logit of slot 0 in the NTM's learned initial weightings when ``focused_start``."""

ModelBuilder = Callable[[SequenceOptions, int, int], nn.Module]


def build_ntm(o: SequenceOptions, inputs: int, outputs: int) -> nn.Module:
    """An NTM whose initial memory is random when ``o.random_memory`` (see :class:`SequenceOptions`)."""
    model = NTM(
        NTMConfig(
            inputs,
            outputs,
            memory_slots=o.memory_slots,
            memory_width=o.memory_width,
            controller_size=o.hidden_size,
            read_heads=o.read_heads,
        )
    )
    with torch.no_grad():
        if o.random_memory:
            bound = 1.0 / math.sqrt(o.memory_slots + o.memory_width)
            model.memory_init.uniform_(-bound, bound)  # a buffer: saved with the model, not trained
        if o.focused_start:
            model.read_weight_logits[:, 0] = FOCUS_LOGIT  # learned parameters: only their start changes
            model.write_weight_logits[:, 0] = FOCUS_LOGIT
    return model


def build_dnc(o: SequenceOptions, inputs: int, outputs: int) -> nn.Module:
    return DNC(
        DNCConfig(
            inputs,
            outputs,
            memory_slots=o.memory_slots,
            memory_width=o.memory_width,
            controller_size=o.hidden_size,
            read_heads=o.read_heads,
        )
    )


def build_lstm(o: SequenceOptions, inputs: int, outputs: int) -> nn.Module:
    return LSTMBaseline(LSTMConfig(inputs, outputs, hidden_size=o.hidden_size, layers=o.layers))


MODELS: dict[str, ModelBuilder] = {"ntm": build_ntm, "dnc": build_dnc, "lstm": build_lstm}

SequenceTask = AlgorithmicTask | GraphTask


def _with_range(task: SequenceTask, low: int | None, high: int | None) -> SequenceTask:
    """The task with its size range replaced (None keeps a bound)."""
    lo_name, hi_name = ("min_hops", "max_hops") if isinstance(task, GraphTask) else ("min_length", "max_length")
    lo = getattr(task, lo_name) if low is None else low
    hi = getattr(task, hi_name) if high is None else high
    return dataclasses.replace(task, **{lo_name: lo, hi_name: hi})  # type: ignore[type-var]


def _range(task: SequenceTask) -> tuple[int, int]:
    if isinstance(task, GraphTask):
        return task.min_hops, task.max_hops
    return task.min_length, task.max_length


class SequenceProblem(Problem):
    """A sequence model on an algorithmic or graph task; see the module docstring."""

    def __init__(self, model: nn.Module, task: SequenceTask, options: SequenceOptions, seed: int, device: torch.device):
        self.model = model
        self.task = task
        self.options = options
        self.device = device
        self.graph = isinstance(task, GraphTask)
        g = eval_generator(seed)
        self.eval_sets: list[tuple[str, SeqBatch]] = [("", task.batch(options.eval_size, g))]
        for length in options.eval_lengths:
            self.eval_sets.append((f"@{length}", task.batch(options.eval_size, g, length=length)))
        self._stages: dict[int, SequenceTask] = {}

    def _train_task(self, step: int) -> SequenceTask:
        c = self.options.curriculum
        lo, hi = _range(self.task)
        if c == 0 or step >= c:
            return self.task
        top = lo + (hi - lo) * step // c  # grows from lo to hi over the first c steps
        if top not in self._stages:
            self._stages[top] = _with_range(self.task, lo, top)
        return self._stages[top]

    def batch(self, batch_size: int, generator: torch.Generator, step: int) -> SeqBatch:
        return self._train_task(step).batch(batch_size, generator).to(self.device)

    def _logits(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)[0]  # (B, T, O)

    def loss(self, batch: Any) -> Tensor:
        logits = self._logits(batch.inputs)
        if self.graph:
            return graphs.cross_entropy(logits, batch)
        return algorithmic.bce_loss(logits, batch)

    def evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for suffix, batch in self.eval_sets:
            logits = self._logits(batch.inputs.to(self.device)).cpu()
            if isinstance(batch, GraphBatch):
                out[f"step_accuracy{suffix}"] = graphs.step_accuracy(logits, batch)
                out[f"seq_accuracy{suffix}"] = graphs.sequence_accuracy(logits, batch)
            else:
                out[f"bit_errors{suffix}"] = float(algorithmic.bit_errors(logits, batch).float().mean())
                out[f"seq_accuracy{suffix}"] = algorithmic.sequence_accuracy(logits, batch)
        return out


def make_task(name: str, options: SequenceOptions) -> SequenceTask:
    """The task ``name`` (a key of ALGORITHMIC or GRAPH_TASKS) with the options' training range."""
    task: SequenceTask
    if name in ALGORITHMIC:
        task = algorithmic.algorithmic_task(name)
    else:
        need(name in GRAPH_TASKS, f"unknown sequence task {name!r}; valid: {', '.join([*ALGORITHMIC, *GRAPH_TASKS])}")
        task = graphs.graph_task(name)
    if options.min_length is None and options.max_length is None:
        return task
    return _with_range(task, options.min_length, options.max_length)  # the task validates its range


def sequence_setup(model: str, task: str) -> Callable[[SequenceOptions, int, torch.device], Problem]:
    """The ``setup`` of the recipe ``model task``."""
    build = MODELS[model]

    def setup(options: SequenceOptions, seed: int, device: torch.device) -> Problem:
        t = make_task(task, options)
        return SequenceProblem(build(options, t.input_size, t.output_size), t, options, seed, device)

    return setup
