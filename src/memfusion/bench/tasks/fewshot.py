"""Few-shot classification episodes (Santoro et al. 2016, "One-shot learning with MANNs").

An episode picks ``n_way`` classes of a :class:`ClassSet`, gives them the labels ``0 .. n_way-1``
in a fresh random order, and shows ``instances`` images of each class in a random interleaving
(``T = n_way * instances`` steps). At step ``t`` the network sees the image ``x_t`` together with
the *previous* step's one-hot label ``y_{t-1}`` (zeros at t = 0) and must output ``y_t``: it can
only be right on a class's first presentation by chance, and must bind the image to the label it
is told one step later. The score is the accuracy on the 1st, 2nd, 5th, 10th ... presentation of a
class (:func:`accuracy_by_instance`).

A class set holds the images of every class; train and test episodes come from disjoint class
sets (:meth:`ClassSet.split`). Glyphs (:mod:`memfusion.bench.tasks.glyphs`) and Omniglot
(:mod:`memfusion.bench.tasks.omniglot`) both produce a :class:`ClassSet`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from memfusion.bench.tasks.algorithmic import SeqBatch
from memfusion.errors import InvalidInput


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassSet:
    """Images grouped by class.

    images: (M, H, W) float32 in [0, 1] (1 = ink); labels: (M,) int64 class index, sorted
    (non-decreasing), every class in ``range(len(names))`` has at least one image; names: one
    name per class. Invariant (checked): class ``c``'s images are the contiguous block
    ``images[starts[c] : starts[c] + counts[c]]``.
    """

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        im, lab = self.images, self.labels
        _need(im.ndim == 3, f"images must be (M, H, W), got shape {im.shape}")
        _need(lab.shape == (im.shape[0],), f"labels must be (M,) = ({im.shape[0]},), got {lab.shape}")
        _need(len(self.names) >= 1 and im.shape[0] >= 1, "a class set needs at least one class and one image")
        _need(im.dtype == np.float32, f"images must be float32, got {im.dtype}")
        _need(bool(np.isfinite(im).all()) and im.min() >= 0.0 and im.max() <= 1.0, "images must lie in [0, 1]")
        counts = np.bincount(lab, minlength=len(self.names)) if lab.min() >= 0 else np.zeros(0)
        _need(
            lab.min() >= 0 and lab.max() < len(self.names) and counts.shape[0] == len(self.names) and counts.min() >= 1,
            f"labels must cover every class 0 .. {len(self.names) - 1} (one per name) at least once",
        )
        _need(bool((np.diff(lab) >= 0).all()), "labels must be sorted so that each class's images are contiguous")

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> ClassSet:
        """A class set from images in any class order (they are sorted by class, stably)."""
        order = np.argsort(labels, kind="stable")
        return cls(np.ascontiguousarray(images[order], dtype=np.float32), labels[order].astype(np.int64), tuple(names))

    @property
    def n_classes(self) -> int:
        return len(self.names)

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def counts(self) -> np.ndarray:
        """(C,) images per class."""
        return np.bincount(self.labels, minlength=self.n_classes)

    @property
    def starts(self) -> np.ndarray:
        """(C,) index of each class's first image."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def subset(self, classes: Sequence[int]) -> ClassSet:
        """The classes ``classes`` (in that order, renumbered 0 ..) with all their images."""
        classes = [int(c) for c in classes]
        _need(len(set(classes)) == len(classes), "subset classes must be distinct")
        _need(all(0 <= c < self.n_classes for c in classes), f"subset classes must lie in [0, {self.n_classes})")
        starts, counts = self.starts, self.counts
        idx = np.concatenate([np.arange(starts[c], starts[c] + counts[c]) for c in classes])
        labels = np.concatenate([np.full(counts[c], i, dtype=np.int64) for i, c in enumerate(classes)])
        return ClassSet(self.images[idx], labels, tuple(self.names[c] for c in classes))

    def split(self, n_first: int, seed: int | None = 0) -> tuple[ClassSet, ClassSet]:
        """Two class sets with disjoint classes: ``n_first`` classes and the rest. With a ``seed``
        the classes are shuffled first (seeded); with ``None`` the split keeps the class order."""
        _need(
            1 <= n_first < self.n_classes,
            f"n_first must leave classes on both sides: 1 <= n_first < {self.n_classes}, got {n_first}",
        )
        order = np.arange(self.n_classes) if seed is None else np.random.default_rng(seed).permutation(self.n_classes)
        return self.subset(order[:n_first].tolist()), self.subset(order[n_first:].tolist())


@dataclasses.dataclass(frozen=True)
class Episode(SeqBatch):
    """A batch of episodes: a :class:`SeqBatch` with the episode's bookkeeping.

    inputs (B, T, H W + N): the flattened image then the previous label's one-hot (zeros at t = 0);
    targets (B, T, N): the label's one-hot; mask (B, T): all ones. labels (B, T) long: the label
    at each step; instance (B, T) long: which presentation of its class this step is (1-based);
    classes (B, N) long: ``classes[b, y]`` is the class-set index given label ``y`` in episode ``b``.
    """

    labels: Tensor
    instance: Tensor
    classes: Tensor


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    """``n_way`` classes per episode (MANN: 5 and 15), ``instances`` presentations of each (MANN: 10).

    The ``i``-th presentation of a class shows the ``(i - 1) mod count``-th image of a random order of
    its ``count`` images: distinct images while it has enough, then the same order again.
    """

    n_way: int = 5
    instances: int = 10

    def __post_init__(self) -> None:
        _need(self.n_way >= 2, f"n_way must be >= 2, got {self.n_way}")
        _need(self.instances >= 1, f"instances must be >= 1, got {self.instances}")

    @property
    def steps(self) -> int:
        return self.n_way * self.instances


class Episodes:
    """Draws batches of episodes from one class set; all randomness comes from the generator passed in."""

    def __init__(self, class_set: ClassSet, config: EpisodeConfig | None = None) -> None:
        self.config = config or EpisodeConfig()
        _need(
            self.config.n_way <= class_set.n_classes,
            f"{self.config.n_way}-way episodes need at least {self.config.n_way} classes; "
            f"the class set has {class_set.n_classes}",
        )
        self.class_set = class_set
        self._images = torch.from_numpy(class_set.images).reshape(class_set.images.shape[0], -1)  # (M, H W)
        self._starts = torch.from_numpy(class_set.starts)  # (C,)
        self._counts = torch.from_numpy(class_set.counts)  # (C,)

    @property
    def input_size(self) -> int:
        return int(self._images.shape[1]) + self.config.n_way

    @property
    def output_size(self) -> int:
        return self.config.n_way

    def batch(self, batch_size: int, generator: torch.Generator) -> Episode:
        _need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        n, k = self.config.n_way, self.config.instances
        b, t = batch_size, n * k
        c = self.class_set.n_classes
        # classes[b, y]: a random n-subset in random order, so label y -> class is a fresh bijection per episode
        classes = torch.rand(b, c, generator=generator).argsort(dim=1)[:, :n]  # (B, N)
        counts = self._counts[classes]  # (B, N)
        cmax = int(counts.max())
        keys = torch.rand(b, n, cmax, generator=generator)  # (B, N, Cmax)
        keys = keys.masked_fill(torch.arange(cmax) >= counts[..., None], float("inf"))
        perm = keys.argsort(dim=-1)  # (B, N, Cmax): a random order of each class's images first
        order = torch.rand(b, t, generator=generator).argsort(dim=1)  # (B, T) random interleaving
        labels = order // k  # (B, T): each label appears K times
        onehot = torch.nn.functional.one_hot(labels, n).float()  # (B, T, N)
        instance = (onehot.cumsum(dim=1) * onehot).sum(-1).long()  # (B, T) 1-based presentation count
        # the i-th presentation of label y shows drawing perm[y, (i - 1) mod count]: distinct while they last
        slot = (instance - 1) % counts.gather(1, labels)  # (B, T)
        drawing = perm.gather(1, labels[..., None].expand(b, t, cmax)).gather(2, slot[..., None]).squeeze(2)  # (B, T)
        image_idx = self._starts[classes].gather(1, labels) + drawing  # (B, T)
        prev = torch.cat([torch.zeros(b, 1, n), onehot[:, :-1]], dim=1)  # (B, T, N) y_{t-1}
        inputs = torch.cat([self._images[image_idx], prev], dim=-1)  # (B, T, H W + N)
        return Episode(inputs, onehot, torch.ones(b, t), labels, instance, classes)


def accuracy_by_instance(
    logits: Tensor, episode: Episode, instances: Sequence[int] = (1, 2, 5, 10)
) -> dict[int, float]:
    """Accuracy (argmax of the logits == label) over the steps that are the ``i``-th presentation of
    their class, for each ``i`` in ``instances``."""
    _need(
        logits.shape == episode.targets.shape,
        f"logits must have the targets' shape {tuple(episode.targets.shape)}, got {tuple(logits.shape)}",
    )
    top = int(episode.instance.max())
    bad = [i for i in instances if not 1 <= i <= top]
    _need(not bad, f"instances {bad} are not shown in these episodes: each class is presented 1 .. {top} times")
    right = logits.argmax(-1) == episode.labels  # (B, T)
    return {int(i): float(right[episode.instance == i].float().mean()) for i in instances}
