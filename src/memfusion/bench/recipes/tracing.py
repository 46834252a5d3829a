"""Knowledge-tracing recipes: DKVMN (Zhang et al. 2017) and the DKT LSTM baseline (Piech et al. 2015).

Data: Synthetic-5 (:class:`~memfusion.bench.tasks.tracing.Synthetic5`, ``students`` training and
``students`` test students, generated once with seed 0: the run's seed changes the initialisation
and the batches, not the data), or ASSISTments (``data=PATH``: ``skill_builder_data.csv``, students
split ``test_fraction`` / rest with seed 0). Training draws ``batch_size`` random training rows per
step; the loss is the binary cross-entropy of every real step's response. Evaluation: the ROC AUC
of the predicted probabilities over every real step of the test rows (``auc``). On Synthetic-5 two
references come with it, on the same test steps:

- ``bayes_auc``: the AUC of the generator's own posterior predictive ``P(r_t | r_<t)`` with its exact
  parameters (:mod:`.kt_bayes`): the best a model that reads the responses can reach;
- ``oracle_auc``: the AUC of the generator's true probabilities, which use the students' latent
  skills: out of reach of any model (an upper bound, not a target).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memfusion.bench.recipes.base import need
from memfusion.bench.recipes.baselines import DKT, DKTConfig
from memfusion.bench.recipes.kt_bayes import bayes_predictions
from memfusion.bench.tasks.tracing import KTSequences, Synthetic5, auc, load_assistments, load_three_line
from memfusion.bench.train import Problem
from memfusion.neural.dkvmn import DKVMN, DKVMNConfig

_EVAL_CHUNK = 512  # test rows run at once


@dataclasses.dataclass(frozen=True)
class TracingOptions:
    """data: an ASSISTments CSV (required by the ``assistments`` task); with ``synthetic5``, a
    training file in the three-line layout (the DKVMN release's ``naive_c5_q50_s4000_v0_train.csv``)
    read instead of generating the data, with ``test_data`` its test file (both or neither; no
    ``bayes_auc`` / ``oracle_auc`` then: the released files carry no generator parameters);
    students: Synthetic-5 students per split; max_length: ASSISTments rows are cut to this many
    interactions; test_fraction: ASSISTments students held out. DKVMN: memory_size ``N``, key_size
    ``d_k``, value_size ``d_v``, summary_size. DKT: hidden_size (LSTM units). bayes_reference: compute
    ``bayes_auc`` on Synthetic-5 (about half a minute for 2,000 test students)."""

    data: Path | None = None
    test_data: Path | None = None
    students: int = 2000
    max_length: int = 200
    test_fraction: float = 0.3
    memory_size: int = 20
    key_size: int = 50
    value_size: int = 200
    summary_size: int = 50
    hidden_size: int = 200
    bayes_reference: bool = True

    def __post_init__(self) -> None:
        for name in ("students", "max_length", "memory_size", "key_size", "value_size", "summary_size", "hidden_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"option {name} must be an integer >= 1, got {v!r}")
        need(0 < self.test_fraction < 1, f"option test_fraction must be in (0, 1), got {self.test_fraction}")


def load_data(task: str, options: TracingOptions) -> tuple[KTSequences, KTSequences, dict[str, float]]:
    """(train, test, reference AUCs) of ``task`` (``synthetic5`` or ``assistments``: no references)."""
    if task == "synthetic5" and (options.data is not None or options.test_data is not None):
        need(
            options.data is not None and options.test_data is not None,
            "Synthetic-5 from files needs both data=TRAIN and test_data=TEST (three-line layout)",
        )
        assert options.data is not None and options.test_data is not None
        train = load_three_line(options.data, max_length=options.max_length)
        test = load_three_line(options.test_data, max_length=options.max_length)
        names = max(train.question_names, test.question_names, key=len)  # question k is id k + 1 in both
        return dataclasses.replace(train, question_names=names), dataclasses.replace(test, question_names=names), {}
    if task == "synthetic5":
        gen = Synthetic5(n_train=options.students, n_test=options.students, seed=0)
        data = gen.generate()
        n, test = options.students, data.test
        refs = {"oracle_auc": auc(data.prob[n:][test.mask], test.responses[test.mask])}
        if options.bayes_reference:
            best = bayes_predictions(test.responses, data.concept, data.difficulty, gen)
            refs["bayes_auc"] = auc(best[test.mask], test.responses[test.mask])
        return data.train, test, refs
    need(
        options.data is not None,
        "the assistments task reads ASSISTments' skill_builder_data.csv: pass --data PATH (nothing is downloaded)",
    )
    assert options.data is not None
    seqs = load_assistments(options.data, max_length=options.max_length)
    train, test = seqs.split_by_student(options.test_fraction, seed=0)
    return train, test, {}


class TracingProblem(Problem):
    """DKVMN or DKT on knowledge-tracing sequences; see the module docstring."""

    def __init__(self, model_name: str, task: str, options: TracingOptions, device: torch.device) -> None:
        self.train, self.test, self.references = load_data(task, options)
        q = self.train.n_questions
        self.model: nn.Module
        if model_name == "dkvmn":
            self.model = DKVMN(
                DKVMNConfig(
                    num_questions=q,
                    memory_size=options.memory_size,
                    key_size=options.key_size,
                    value_size=options.value_size,
                    summary_size=options.summary_size,
                )
            )
        else:
            self.model = DKT(DKTConfig(num_questions=q, hidden_size=options.hidden_size))
        self.device = device

    def _logits(self, seqs: KTSequences) -> Tensor:
        questions = seqs.one_based().to(self.device)  # (B, T), 0 = padding
        responses = seqs.responses.to(self.device)  # (B, T)
        if isinstance(self.model, DKVMN):
            return self.model.predict_logits(questions, responses)[0]  # (B, T)
        assert isinstance(self.model, DKT)
        return self.model.predict_logits(questions, responses)  # (B, T)

    def batch(self, batch_size: int, generator: torch.Generator, step: int) -> KTSequences:
        return self.train.select(torch.randint(len(self.train), (batch_size,), generator=generator))

    def loss(self, batch: Any) -> Tensor:
        mask = batch.mask.to(self.device)  # (B, T)
        logits = self._logits(batch)[mask]  # (K,) real steps
        return F.binary_cross_entropy_with_logits(logits, batch.responses.to(self.device)[mask].float())

    def evaluate(self) -> dict[str, float]:
        scores, labels = [], []
        for seqs in self.test.batches(_EVAL_CHUNK):
            scores.append(torch.sigmoid(self._logits(seqs)).cpu()[seqs.mask])
            labels.append(seqs.responses[seqs.mask])
        return {"auc": auc(torch.cat(scores), torch.cat(labels)), **self.references}


def tracing_setup(model: str, task: str) -> Any:
    """The ``setup`` of the recipe ``model task``."""

    def setup(options: TracingOptions, seed: int, device: torch.device) -> Problem:
        return TracingProblem(model, task, options, device)

    return setup
