"""Few-shot recipes (Santoro et al. 2016): MANN and the LSTM baseline on episodes of glyph or Omniglot classes.

The classes are split once into disjoint training and test classes (Santoro et al.: 1200 and 423 of
Omniglot's 1623). The default class set is the procedural glyph alphabet
(:mod:`memfusion.bench.tasks.glyphs`, 1623 classes of 20 instances, 20 x 20 images, seeded
independently of the run); ``data=PATH`` (``--data``) reads Omniglot's two halves instead
(:func:`~memfusion.bench.tasks.omniglot.load_omniglot`, resized to 20 x 20 as in the paper).

Training: fresh episodes of ``n_way`` classes x ``instances`` presentations from the training
classes; the loss is the cross-entropy of every step's label. Evaluation: ``eval_episodes`` episodes of
the test classes (the same ones at every evaluation), the accuracy at the 1st, 2nd, 5th and 10th
presentation of a class (``accuracy_1`` ...), as the paper's Table 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memfusion.bench.recipes.base import eval_generator, need
from memfusion.bench.recipes.baselines import LSTMBaseline, LSTMConfig
from memfusion.bench.tasks.fewshot import ClassSet, Episode, EpisodeConfig, Episodes, accuracy_by_instance
from memfusion.bench.train import Problem
from memfusion.neural.mann import MANN, MANNConfig

REPORTED_INSTANCES = (1, 2, 5, 10)
_EVAL_CHUNK = 100  # evaluation episodes run at once


@dataclasses.dataclass(frozen=True)
class FewShotOptions:
    """n_way (5 or 15 in the paper) classes per episode, ``instances`` presentations of each; data: an
    Omniglot root (None: the glyphs); glyph_classes: size of the glyph alphabet; train_classes: how
    many classes train (the rest test). hidden_size / layers: the controller (MANN) or the LSTM
    baseline; memory_slots, memory_width, read_heads: MANN's memory; learn_key_strength: MANN's heads
    also emit a key strength ``beta`` (the paper reads with ``softmax(cosine)``, strength 1: over 128
    slots that read is blurred). eval_episodes: test episodes."""

    n_way: int = 5
    instances: int = 10
    data: Path | None = None
    glyph_classes: int = 1623
    train_classes: int = 1200
    hidden_size: int = 200
    layers: int = 1
    memory_slots: int = 128
    memory_width: int = 40
    read_heads: int = 4
    learn_key_strength: bool = False
    eval_episodes: int = 1000

    def __post_init__(self) -> None:
        for name in ("instances", "glyph_classes", "train_classes", "hidden_size", "layers", "memory_slots"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"option {name} must be an integer >= 1, got {v!r}")
        for name in ("memory_width", "read_heads", "eval_episodes"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"option {name} must be an integer >= 1, got {v!r}")
        need(self.n_way >= 2, f"option n_way must be >= 2, got {self.n_way}")


def load_classes(options: FewShotOptions) -> tuple[ClassSet, ClassSet]:
    """(train, test) class sets: disjoint classes, split by a fixed seed (0)."""
    if options.data is not None:
        from memfusion.bench.tasks.omniglot import OmniglotSplit, load_omniglot

        classes = load_omniglot(options.data, OmniglotSplit.BOTH, size=20)
    else:
        from memfusion.bench.tasks.glyphs import GlyphConfig, glyph_class_set

        classes = glyph_class_set(GlyphConfig(n_classes=options.glyph_classes))
    need(
        options.train_classes < classes.n_classes,
        f"option train_classes ({options.train_classes}) must leave test classes: the class set has "
        f"{classes.n_classes}",
    )
    need(
        classes.n_classes - options.train_classes >= options.n_way,
        f"{options.n_way}-way test episodes need {options.n_way} test classes; only "
        f"{classes.n_classes - options.train_classes} are left after train_classes={options.train_classes}",
    )
    return classes.split(options.train_classes, seed=0)


def _mann(o: FewShotOptions, inputs: int, outputs: int) -> nn.Module:
    return MANN(
        MANNConfig(
            inputs,
            outputs,
            memory_slots=o.memory_slots,
            memory_width=o.memory_width,
            controller_size=o.hidden_size,
            read_heads=o.read_heads,
            learn_key_strength=o.learn_key_strength,
        )
    )


def _lstm(o: FewShotOptions, inputs: int, outputs: int) -> nn.Module:
    return LSTMBaseline(LSTMConfig(inputs, outputs, hidden_size=o.hidden_size, layers=o.layers))


MODELS = {"mann": _mann, "lstm": _lstm}


class FewShotProblem(Problem):
    """A sequence model on few-shot episodes; see the module docstring."""

    def __init__(self, model_name: str, options: FewShotOptions, seed: int, device: torch.device) -> None:
        train, test = load_classes(options)
        config = EpisodeConfig(n_way=options.n_way, instances=options.instances)
        self.train_episodes = Episodes(train, config)
        self.test_episodes = Episodes(test, config)
        self.model = MODELS[model_name](options, self.train_episodes.input_size, self.train_episodes.output_size)
        self.options, self.seed, self.device = options, seed, device
        self.instances = tuple(i for i in REPORTED_INSTANCES if i <= options.instances)

    def _logits(self, episode: Episode) -> Tensor:
        return self.model(episode.inputs)[0]  # (B, T, N)

    def batch(self, batch_size: int, generator: torch.Generator, step: int) -> Episode:
        return self.train_episodes.batch(batch_size, generator).to(self.device)

    def loss(self, batch: Any) -> Tensor:
        logits = self._logits(batch)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1))

    def evaluate(self) -> dict[str, float]:
        g = eval_generator(self.seed)  # the same test episodes at every evaluation
        sums = dict.fromkeys(self.instances, 0.0)
        left = self.options.eval_episodes
        while left > 0:
            n = min(_EVAL_CHUNK, left)
            episode = self.test_episodes.batch(n, g)
            acc = accuracy_by_instance(self._logits(episode.to(self.device)).cpu(), episode, self.instances)
            for i in self.instances:  # every chunk has n * n_way steps at each instance: weight by n
                sums[i] += acc[i] * n
            left -= n
        return {f"accuracy_{i}": sums[i] / self.options.eval_episodes for i in self.instances}


def fewshot_setup(model: str) -> Any:
    """The ``setup`` of the recipe ``model fewshot``."""

    def setup(options: FewShotOptions, seed: int, device: torch.device) -> Problem:
        return FewShotProblem(model, options, seed, device)

    return setup
