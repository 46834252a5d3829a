"""The shared base of the recurrent memory-augmented networks (NTM, DNC, MANN, DKVMN).

A network is a :class:`SequenceMemory`: it implements ``initial_state`` and one ``step``;
``forward`` runs the steps over a sequence. The memory state is a :class:`MemoryState`, a frozen
dataclass of tensors whose first dimension is the batch, passed in and returned out explicitly:
the module itself holds only parameters, so one module serves any number of independent memories.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Self, TypeVar

import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class MemoryState:
    """A memory's state: every field is a tensor (B, ...) or a tuple of such tensors.

    Invariant: all tensors share the batch size, device and dtype of the network that made them
    (one documented exception: the DND's state is one dictionary shared by the whole batch, as in
    NEC, so its first dimension is the slot).
    ``to_dict`` / ``from_dict`` round-trip exactly (``torch.save`` the dict to persist a state).
    """

    def map(self, fn: Callable[[Tensor], Tensor]) -> Self:
        """A copy with ``fn`` applied to every tensor (e.g. ``Tensor.detach`` for truncated BPTT)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = tuple(fn(t) for t in v) if isinstance(v, tuple) else fn(v)
        return type(self)(**out)

    def detach(self) -> Self:
        return self.map(Tensor.detach)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise InvalidInput(
                f"a {cls.__name__} needs exactly the fields {sorted(names)}, got {sorted(data)}"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


S = TypeVar("S", bound=MemoryState)


class SequenceMemory(nn.Module, ABC):
    """A recurrent network with an external memory: ``x (B, T, input_size) -> y (B, T, output_size)``.

    Subclasses set ``input_size`` / ``output_size`` and implement :meth:`initial_state` and
    :meth:`step`; ``forward`` validates the input and loops over time (the batch is never looped).
    """

    input_size: int
    output_size: int

    @abstractmethod
    def initial_state(self, batch_size: int, device: torch.device | None = None) -> MemoryState:
        """The state before the first step, for ``batch_size`` independent sequences."""

    @abstractmethod
    def step(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        """One time step: x (B, input_size) -> (y (B, output_size), next state)."""

    def _checked(self, x: Tensor, state: MemoryState, kind: type[S]) -> S:
        """``state`` as a ``kind``, after checking it and ``x (B, input_size)`` against the state's
        batch (the first dimension of its first field)."""
        name = type(self).__name__
        if not isinstance(state, kind):
            article = "an" if kind.__name__[0] in "AEFHILMNORSX" else "a"  # letter names: "an NTM..."
            raise InvalidInput(f"{name}.step needs {article} {kind.__name__}, got {type(state).__name__}")
        batch = getattr(state, dataclasses.fields(state)[0].name).shape[0]
        if x.dim() != 2 or x.shape[1] != self.input_size or x.shape[0] != batch:
            raise InvalidInput(
                f"{name}.step expects x of shape (B, {self.input_size}) with B = the state's batch "
                f"{batch}, got {tuple(x.shape)}"
            )
        return state

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Run the sequence x (B, T, input_size); returns (y (B, T, output_size), final state)."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise InvalidInput(
                f"{type(self).__name__} expects input of shape (B, T, {self.input_size}), got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise InvalidInput(f"{type(self).__name__} input contains NaN or inf")
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1), state  # (B, T, output_size)
