"""The Differentiable Neural Computer (Graves et al. 2016, Methods), batched.

One step, in the order of the paper and deepmind/dnc ``MemoryAccess._step``:

1. the LSTM controller reads ``[x_t, r_{t-1}]`` and emits the interface vector;
2. usage ``u_t`` from the previous write weights (stop-gradient), free gates and read weights;
3. write weights: allocation (from ``u_t``) vs content (on ``M_{t-1}``), allocation and write gates;
4. erase / add write to the memory;
5. temporal link matrix and precedence;
6. read weights: content (on ``M_t``), forward ``L w^r_{t-1}`` and backward ``L^T w^r_{t-1}`` mixed
   by the read modes; optionally sparse (top-k, renormalised); then the reads ``r_t``;
7. output ``y_t = W [h_t, r_t]`` (raw logits).

Every mechanism is a function of :mod:`memfusion.neural.functional`; nothing loops over the
batch or the slots (only over the few write heads inside the allocation).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memfusion.errors import InvalidInput
from memfusion.neural.base import MemoryState, SequenceMemory
from memfusion.neural.functional import (
    _content_address,
    _dnc_backward_weights,
    _dnc_forward_weights,
    _dnc_link,
    _dnc_precedence,
    _dnc_read_weights,
    _dnc_usage,
    _dnc_write_weights,
    _erase_add_write,
    _sparse_topk,
    _weighted_read,
)


@dataclasses.dataclass(frozen=True)
class DNCConfig:
    """Sizes of a :class:`DNC`.

    Defaults are deepmind/dnc's ``train.py`` (repeat-copy): memory_slots ``N`` = 16 of width
    ``W`` = 16, 4 read heads, 1 write head, an LSTM controller of 64 units. The paper's bAbI model
    used N = 256, W = 64, 4 read heads and 256 LSTM units. ``sparse_reads``: when set to k, every
    read weighting keeps only its k largest entries, renormalised (sparse access, Rae et al. 2016).
    """

    input_size: int
    output_size: int
    memory_slots: int = 16
    memory_width: int = 16
    controller_size: int = 64
    read_heads: int = 4
    write_heads: int = 1
    sparse_reads: int | None = None

    def __post_init__(self) -> None:
        sizes = ("input_size", "output_size", "memory_slots", "memory_width", "controller_size")
        for name in (*sizes, "read_heads", "write_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInput(f"DNCConfig.{name} must be an integer >= 1, got {value!r}")
        k = self.sparse_reads
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.memory_slots):
            raise InvalidInput(
                f"DNCConfig.sparse_reads must be None (dense reads) or an integer in [1, memory_slots="
                f"{self.memory_slots}], got {k!r}"
            )

    @property
    def interface_size(self) -> int:
        """Length of the interface vector ``xi_t`` emitted by the controller."""
        r, w, m = self.read_heads, self.write_heads, self.memory_width
        return r * m + r + w * m + w + 2 * w * m + r + w + w + r * (2 * w + 1)


@dataclasses.dataclass(frozen=True)
class DNCState(MemoryState):
    """The DNC's state between steps.

    memory (B, N, M); usage (B, N) in [0, 1]; link (B, W, N, N) with a zero diagonal, one per write
    head; precedence (B, W, N) each row summing to <= 1; read_weights (B, R, N) and write_weights
    (B, W, N), each row summing to <= 1; reads (B, R, M); controller ``(h, c)`` each (B, C).
    The initial state is all zeros (as deepmind/dnc).
    """

    memory: Tensor
    usage: Tensor
    link: Tensor
    precedence: Tensor
    read_weights: Tensor
    write_weights: Tensor
    reads: Tensor
    controller: tuple[Tensor, ...]


def oneplus(x: Tensor) -> Tensor:
    """``1 + softplus(x)``: the DNC's activation for key strengths (values in [1, inf))."""
    return 1.0 + F.softplus(x)


class DNC(SequenceMemory):
    """A batched Differentiable Neural Computer: ``x (B, T, input_size) -> y (B, T, output_size)``.

    Interface activations (paper, Methods): keys linear, strengths ``oneplus``, erase, free,
    allocation and write gates ``sigmoid``, write vectors linear, read modes ``softmax`` over
    ``2W + 1`` modes ordered as deepmind/dnc (W backward, W forward, content).
    """

    def __init__(self, config: DNCConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.input_size = c.input_size
        self.output_size = c.output_size
        self.controller = nn.LSTMCell(c.input_size + c.read_heads * c.memory_width, c.controller_size)
        self.interface = nn.Linear(c.controller_size, c.interface_size)
        self.output = nn.Linear(c.controller_size + c.read_heads * c.memory_width, c.output_size)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> DNCState:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput(f"batch_size must be an integer >= 1, got {batch_size!r}")
        c = self.config
        b, n, m, r, w = batch_size, c.memory_slots, c.memory_width, c.read_heads, c.write_heads
        ref = self.output.weight
        dev = ref.device if device is None else device

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=ref.dtype, device=dev)

        return DNCState(
            memory=zeros(b, n, m),
            usage=zeros(b, n),
            link=zeros(b, w, n, n),
            precedence=zeros(b, w, n),
            read_weights=zeros(b, r, n),
            write_weights=zeros(b, w, n),
            reads=zeros(b, r, m),
            controller=(zeros(b, c.controller_size), zeros(b, c.controller_size)),
        )

    def step(self, x: Tensor, state: MemoryState) -> tuple[Tensor, DNCState]:
        state = self._checked(x, state, DNCState)
        c = self.config
        r, w, m = c.read_heads, c.write_heads, c.memory_width
        b = x.shape[0]
        inp = torch.cat([x, state.reads.reshape(b, -1)], dim=-1)  # (B, I + R*M)
        h, cell = self.controller(inp, (state.controller[0], state.controller[1]))  # (B, C)
        (
            read_keys,
            read_strengths,
            write_keys,
            write_strengths,
            erase,
            write_vectors,
            free_gates,
            allocation_gates,
            write_gates,
            read_modes,
        ) = self.interface(h).split([r * m, r, w * m, w, w * m, w * m, r, w, w, r * (2 * w + 1)], dim=-1)

        usage = _dnc_usage(state.usage, state.write_weights, torch.sigmoid(free_gates), state.read_weights)  # (B, N)
        write_content = _content_address(state.memory, write_keys.view(b, w, m), oneplus(write_strengths))  # (B, W, N)
        write_weights = _dnc_write_weights(
            usage, write_content, torch.sigmoid(write_gates), torch.sigmoid(allocation_gates)
        )  # (B, W, N)
        memory = _erase_add_write(
            state.memory, write_weights, torch.sigmoid(erase).view(b, w, m), write_vectors.view(b, w, m)
        )  # (B, N, M)
        link = _dnc_link(state.link, state.precedence, write_weights)  # (B, W, N, N)
        precedence = _dnc_precedence(state.precedence, write_weights)  # (B, W, N)

        read_content = _content_address(memory, read_keys.view(b, r, m), oneplus(read_strengths))  # (B, R, N)
        read_weights = _dnc_read_weights(
            read_content,
            _dnc_forward_weights(link, state.read_weights),  # (B, R, W, N)
            _dnc_backward_weights(link, state.read_weights),  # (B, R, W, N)
            torch.softmax(read_modes.view(b, r, 2 * w + 1), dim=-1),  # (B, R, 2W + 1)
        )  # (B, R, N)
        if c.sparse_reads is not None:
            read_weights = _sparse_topk(read_weights, c.sparse_reads)  # (B, R, N), k non-zeros per row
        reads = _weighted_read(memory, read_weights)  # (B, R, M)
        y = self.output(torch.cat([h, reads.reshape(b, -1)], dim=-1))  # (B, O)
        return y, DNCState(memory, usage, link, precedence, read_weights, write_weights, reads, (h, cell))
