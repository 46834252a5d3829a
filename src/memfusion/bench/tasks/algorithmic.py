"""The NTM paper's algorithmic tasks (Graves et al. 2014): copy, repeat copy, associative recall, priority sort.

Every task is a small frozen config dataclass with ``batch(batch_size, generator, length=None)``
returning a :class:`SeqBatch`. A sequence is an *input phase* (the data and its delimiter
channels) followed by an *answer phase* during which the inputs are zero and the network must
emit the targets; ``mask`` is 1 exactly on the answer steps, so the loss and the score cover
them only. Rows of one batch have different lengths: each row is laid out from t = 0 and padded
at its end (zero inputs, zero targets, mask 0) up to the longest row, so a recurrent model never
sees padding before the row's answer.

``length`` is the task's size knob (the copied sequence's length, the number of items, the
number of vectors to sort), drawn uniformly from ``[min_length, max_length]`` per row; passing
``length=`` to ``batch`` fixes it for every row and may exceed ``max_length``: that is the
generalisation test (train on 1-20, test on 40). Targets are bits; a model emits logits and a
bit counts as predicted 1 when its logit is > 0 (:func:`bit_errors`).

All randomness comes from the ``torch.Generator`` passed in: the same generator state gives the
same batch. Tensors are float32 on the CPU (``SeqBatch.to`` moves them).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor

from memfusion.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class SeqBatch:
    """A batch of padded sequences.

    inputs (B, T, I) float; targets (B, T, O) float; mask (B, T) float, 1 on the steps the loss
    and the score apply to and 0 elsewhere (input phase and padding). Invariant: the three
    tensors share B and T; targets are 0 wherever mask is 0.
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        i, t, m = self.inputs, self.targets, self.mask
        if i.dim() != 3 or t.dim() != 3 or m.dim() != 2 or i.shape[:2] != t.shape[:2] or i.shape[:2] != m.shape:
            raise InvalidInput(
                f"a SeqBatch needs inputs (B, T, I), targets (B, T, O), mask (B, T) with the same B and T; "
                f"got {tuple(i.shape)}, {tuple(t.shape)}, {tuple(m.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def steps(self) -> int:
        return int(self.inputs.shape[1])

    def to(self, device: torch.device | str) -> Self:
        """A copy with every tensor field moved to ``device`` (other fields are kept)."""
        moved: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return type(self)(**moved)


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


def place(seq: Tensor, offset: Tensor, length: Tensor, steps: int) -> Tensor:
    """Lay ``seq[b, :length[b]]`` out at times ``offset[b] ...`` of a zero (B, steps, C) tensor.

    seq: (B, S, C); offset, length: (B,) long. Positions past ``steps`` are dropped (callers size
    ``steps`` so that nothing is).
    """
    b, s, c = seq.shape
    if s == 0:
        return seq.new_zeros(b, steps, c)
    i = torch.arange(steps)[None, :] - offset[:, None]  # (B, T): index into seq for each output time
    valid = (i >= 0) & (i < length[:, None])  # (B, T)
    idx = i.clamp(0, s - 1)[..., None].expand(b, steps, c)  # (B, T, C)
    return seq.gather(1, idx) * valid[..., None].to(seq.dtype)  # (B, T, C)


def span_mask(offset: Tensor, length: Tensor, steps: int) -> Tensor:
    """(B, steps) float: 1 on ``offset[b] <= t < offset[b] + length[b]``."""
    t = torch.arange(steps)[None, :]
    return ((t >= offset[:, None]) & (t < (offset + length)[:, None])).float()  # (B, T)


def _bits(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator).float()


class AlgorithmicTask(ABC):
    """What every algorithmic task offers: sizes, the length range and :meth:`batch`."""

    name: ClassVar[str]
    shortest: ClassVar[int] = 1  # the smallest meaningful length
    min_length: int
    max_length: int

    @property
    @abstractmethod
    def input_size(self) -> int: ...

    @property
    @abstractmethod
    def output_size(self) -> int: ...

    @abstractmethod
    def _make(self, lengths: Tensor, generator: torch.Generator) -> SeqBatch: ...

    def _check_range(self) -> None:
        _need(
            self.shortest <= self.min_length <= self.max_length,
            f"{type(self).__name__} needs {self.shortest} <= min_length <= max_length, got "
            f"min_length={self.min_length}, max_length={self.max_length}",
        )

    def batch(self, batch_size: int, generator: torch.Generator, length: int | None = None) -> SeqBatch:
        """``batch_size`` rows with lengths drawn from ``[min_length, max_length]``, or all equal to ``length``."""
        _need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        if length is None:
            lengths = torch.randint(self.min_length, self.max_length + 1, (batch_size,), generator=generator)
        else:
            _need(length >= self.shortest, f"length must be >= {self.shortest} for {type(self).__name__}, got {length}")
            lengths = torch.full((batch_size,), length, dtype=torch.long)
        return self._make(lengths, generator)


@dataclasses.dataclass(frozen=True)
class Copy(AlgorithmicTask):
    """Copy: ``L`` random ``width``-bit vectors, a delimiter flag on channel ``width``, then the
    network writes the ``L`` vectors back. I = width + 1, O = width, T = 2 L + 1 for a row."""

    name: ClassVar[str] = "copy"
    width: int = 8
    min_length: int = 1
    max_length: int = 20

    def __post_init__(self) -> None:
        _need(self.width >= 1, f"width must be >= 1, got {self.width}")
        self._check_range()

    @property
    def input_size(self) -> int:
        return self.width + 1

    @property
    def output_size(self) -> int:
        return self.width

    def _make(self, lengths: Tensor, generator: torch.Generator) -> SeqBatch:
        b, w, lmax = lengths.shape[0], self.width, int(lengths.max())
        steps = 2 * lmax + 1
        seq = _bits(generator, b, lmax, w)  # (B, Lmax, W)
        zero = torch.zeros_like(lengths)
        inputs = F.pad(place(seq, zero, lengths, steps), (0, 1))  # (B, T, W + 1)
        inputs[torch.arange(b), lengths, w] = 1.0  # the delimiter right after the data
        targets = place(seq, lengths + 1, lengths, steps)  # (B, T, W)
        return SeqBatch(inputs, targets, span_mask(lengths + 1, lengths, steps))


@dataclasses.dataclass(frozen=True)
class RepeatCopy(AlgorithmicTask):
    """Repeat copy: ``L`` vectors, a delimiter (channel ``width``), then the repeat count ``n`` as
    the scalar ``n / repeat_norm`` on channel ``width + 1``; the network writes the sequence ``n``
    times and then raises the end marker (output channel ``width``) for one step.

    I = width + 2, O = width + 1, T = L + 2 + n L + 1. ``repeat_norm`` is fixed separately from
    ``max_repeats`` so that a model trained with 1-10 repeats reads 20 repeats on the same scale.
    """

    name: ClassVar[str] = "repeat_copy"
    width: int = 8
    min_length: int = 1
    max_length: int = 10
    min_repeats: int = 1
    max_repeats: int = 10
    repeat_norm: float = 10.0

    def __post_init__(self) -> None:
        _need(self.width >= 1, f"width must be >= 1, got {self.width}")
        self._check_range()
        _need(
            1 <= self.min_repeats <= self.max_repeats,
            f"need 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}",
        )
        _need(self.repeat_norm > 0, f"repeat_norm must be > 0, got {self.repeat_norm}")

    @property
    def input_size(self) -> int:
        return self.width + 2

    @property
    def output_size(self) -> int:
        return self.width + 1

    def _make(self, lengths: Tensor, generator: torch.Generator) -> SeqBatch:
        b, w, lmax = lengths.shape[0], self.width, int(lengths.max())
        repeats = torch.randint(self.min_repeats, self.max_repeats + 1, (b,), generator=generator)
        out_len = lengths * repeats  # (B,) answer vectors before the end marker
        steps = int((lengths + 3 + out_len).max())  # max over rows of L + 2 + n L + 1
        seq = _bits(generator, b, lmax, w)  # (B, Lmax, W)
        rows = torch.arange(b)
        inputs = F.pad(place(seq, torch.zeros_like(lengths), lengths, steps), (0, 2))  # (B, T, W + 2)
        inputs[rows, lengths, w] = 1.0
        inputs[rows, lengths + 1, w + 1] = repeats.float() / self.repeat_norm
        k = torch.arange(int(out_len.max()))  # answer position within the repeats
        rep = seq.gather(1, (k[None, :] % lengths[:, None])[..., None].expand(b, k.shape[0], w))  # (B, nLmax, W)
        start = lengths + 2
        targets = F.pad(place(rep, start, out_len, steps), (0, 1))  # (B, T, W + 1)
        targets[rows, start + out_len, w] = 1.0  # the end marker
        return SeqBatch(inputs, targets, span_mask(start, out_len + 1, steps))


@dataclasses.dataclass(frozen=True)
class AssociativeRecall(AlgorithmicTask):
    """Associative recall: ``k`` items of ``item_len`` ``width``-bit vectors, each preceded by an
    item delimiter (channel ``width``); then the query, a copy of one of the first ``k - 1`` items
    between two query delimiters (channel ``width + 1``); the network must write the item that
    followed the query item. ``length`` is the number of items ``k`` (>= 2). Items of one row are
    distinct, so the answer is unique. I = width + 2, O = width, T = k (item_len + 1) + 2 item_len + 2.
    """

    name: ClassVar[str] = "associative_recall"
    shortest: ClassVar[int] = 2
    width: int = 6
    item_len: int = 3
    min_length: int = 2
    max_length: int = 6

    def __post_init__(self) -> None:
        _need(
            self.width >= 1 and self.item_len >= 1,
            f"width and item_len must be >= 1, got {self.width}, {self.item_len}",
        )
        self._check_range()
        _need(
            2 ** (self.width * self.item_len) >= self.max_length,
            f"{self.max_length} distinct items do not fit in {self.width * self.item_len} bits",
        )

    @property
    def input_size(self) -> int:
        return self.width + 2

    @property
    def output_size(self) -> int:
        return self.width

    def _items(self, lengths: Tensor, generator: torch.Generator) -> Tensor:
        """(B, Kmax, item_len, width) random items, redrawn per row until a row's first k are distinct."""
        b, kmax = lengths.shape[0], int(lengths.max())
        _need(
            2 ** (self.width * self.item_len) >= kmax,
            f"{kmax} distinct items do not fit in {self.width * self.item_len} bits",
        )
        items = _bits(generator, b, kmax, self.item_len, self.width)
        weights = 2.0 ** torch.arange(self.item_len * self.width, dtype=torch.float64)
        valid = torch.arange(kmax)[None, :] < lengths[:, None]  # (B, Kmax)
        while True:
            codes = (items.reshape(b, kmax, -1).double() * weights).sum(-1)  # (B, Kmax) the item as an integer
            same = codes[:, :, None] == codes[:, None, :]  # (B, Kmax, Kmax)
            pair_valid = valid[:, :, None] & valid[:, None, :] & ~torch.eye(kmax, dtype=torch.bool)
            bad = (same & pair_valid).any(-1).any(-1)  # (B,)
            if not bool(bad.any()):
                return items
            redraw = _bits(generator, int(bad.sum()), kmax, self.item_len, self.width)
            items[bad] = redraw

    def _make(self, lengths: Tensor, generator: torch.Generator) -> SeqBatch:
        b, w, n = lengths.shape[0], self.width, self.item_len
        kmax = int(lengths.max())
        items = self._items(lengths, generator)  # (B, Kmax, n, W)
        query = (torch.rand(b, generator=generator) * (lengths - 1).float()).long()  # (B,) in [0, k - 2]
        block = torch.zeros(b, kmax, n + 1, w + 2)
        block[:, :, 0, w] = 1.0  # item delimiter
        block[:, :, 1:, :w] = items
        stream = block.reshape(b, kmax * (n + 1), w + 2)  # (B, Kmax (n + 1), W + 2)
        q0 = lengths * (n + 1)  # (B,) time of the first query delimiter
        answer_at = q0 + n + 2
        steps = int((answer_at + n).max())
        rows = torch.arange(b)
        qblock = torch.zeros(b, n + 2, w + 2)
        qblock[:, 0, w + 1] = 1.0
        qblock[:, -1, w + 1] = 1.0
        qblock[:, 1:-1, :w] = items[rows, query]  # (B, n, W)
        inputs = place(stream, torch.zeros_like(lengths), q0, steps) + place(
            qblock, q0, torch.full_like(lengths, n + 2), steps
        )  # (B, T, W + 2)
        length_n = torch.full_like(lengths, n)
        targets = place(items[rows, query + 1], answer_at, length_n, steps)  # (B, T, W)
        return SeqBatch(inputs, targets, span_mask(answer_at, length_n, steps))


@dataclasses.dataclass(frozen=True)
class PrioritySort(AlgorithmicTask):
    """Priority sort: ``L`` random vectors, each with a priority drawn uniformly from [-1, 1] on
    channel ``width``; a delimiter (channel ``width + 1``); then the network writes the ``keep``
    highest-priority vectors, highest priority first (all ``L`` when ``keep`` is None, and at most
    ``L``). Graves et al.: 20 inputs, 16 outputs. I = width + 2, O = width, T = L + 1 + min(keep, L).
    """

    name: ClassVar[str] = "priority_sort"
    width: int = 8
    min_length: int = 20
    max_length: int = 20
    keep: int | None = 16

    def __post_init__(self) -> None:
        _need(self.width >= 1, f"width must be >= 1, got {self.width}")
        self._check_range()
        _need(self.keep is None or self.keep >= 1, f"keep must be >= 1 or None, got {self.keep}")

    @property
    def input_size(self) -> int:
        return self.width + 2

    @property
    def output_size(self) -> int:
        return self.width

    def _make(self, lengths: Tensor, generator: torch.Generator) -> SeqBatch:
        b, w, lmax = lengths.shape[0], self.width, int(lengths.max())
        out_len = lengths if self.keep is None else lengths.clamp(max=self.keep)  # (B,)
        seq = _bits(generator, b, lmax, w)  # (B, Lmax, W)
        prio = torch.rand(b, lmax, generator=generator) * 2.0 - 1.0  # (B, Lmax)
        valid = torch.arange(lmax)[None, :] < lengths[:, None]  # (B, Lmax)
        order = prio.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)  # (B, Lmax)
        ranked = seq.gather(1, order[..., None].expand(b, lmax, w))  # (B, Lmax, W) highest priority first
        steps = int((lengths + 1 + out_len).max())
        data = torch.cat([seq, prio[..., None]], dim=-1)  # (B, Lmax, W + 1)
        inputs = F.pad(place(data, torch.zeros_like(lengths), lengths, steps), (0, 1))  # (B, T, W + 2)
        inputs[torch.arange(b), lengths, w + 1] = 1.0
        targets = place(ranked, lengths + 1, out_len, steps)  # (B, T, W)
        return SeqBatch(inputs, targets, span_mask(lengths + 1, out_len, steps))


ALGORITHMIC: dict[str, type[AlgorithmicTask]] = {
    "copy": Copy,
    "repeat_copy": RepeatCopy,
    "associative_recall": AssociativeRecall,
    "priority_sort": PrioritySort,
}


def algorithmic_task(name: str, **params: Any) -> AlgorithmicTask:
    """The task registered under ``name`` (a key of :data:`ALGORITHMIC`), configured with ``params``."""
    if name not in ALGORITHMIC:
        raise InvalidInput(f"unknown algorithmic task {name!r}; valid: {', '.join(sorted(ALGORITHMIC))}")
    try:
        return ALGORITHMIC[name](**params)
    except TypeError as e:  # an unknown parameter name
        raise InvalidInput(f"bad parameters for {name!r}: {e}") from None


def _check_logits(logits: Tensor, batch: SeqBatch) -> None:
    _need(
        logits.shape == batch.targets.shape,
        f"logits must have the targets' shape {tuple(batch.targets.shape)}, got {tuple(logits.shape)}",
    )


def bit_errors(logits: Tensor, batch: SeqBatch) -> Tensor:
    """(B,) long: per sequence, the number of target bits on masked steps that the logits get wrong
    (a bit is predicted 1 when its logit is > 0)."""
    _check_logits(logits, batch)
    wrong = (logits > 0) != (batch.targets > 0.5)  # (B, T, O)
    return (wrong & (batch.mask > 0)[..., None]).sum(dim=(1, 2))


def sequence_accuracy(logits: Tensor, batch: SeqBatch) -> float:
    """The fraction of sequences whose every answer bit is right."""
    return float((bit_errors(logits, batch) == 0).float().mean())


def bce_loss(logits: Tensor, batch: SeqBatch) -> Tensor:
    """Binary cross-entropy with logits, averaged over the masked steps' target bits (a scalar)."""
    _check_logits(logits, batch)
    per_bit = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none")  # (B, T, O)
    weights = batch.mask[..., None].expand_as(per_bit)  # (B, T, O)
    return (per_bit * weights).sum() / weights.sum().clamp(min=1.0)
