"""The Neural Turing Machine (Graves, Wayne & Danihelka 2014), batched.

One step: the controller reads ``[x_t, r_{t-1}]``; every write head addresses the memory
(:func:`~memfusion.neural.functional.ntm_address`) and writes (erase then add, all write heads at
once); then every read head addresses the *written* memory and reads; the output layer maps
``[controller output, reads]`` to ``y_t`` (raw logits: apply the sigmoid / loss outside).
All heads of one kind are addressed in one batched call: no loop over the batch, slots or heads.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memfusion.errors import InvalidInput
from memfusion.neural.base import MemoryState, SequenceMemory
from memfusion.neural.functional import _erase_add_write, _ntm_address, _weighted_read


class Controller(enum.Enum):
    """The NTM controller: an LSTM cell, or one feed-forward layer ``tanh(W [x, r] + b)``."""

    LSTM = "lstm"
    FEEDFORWARD = "feedforward"


@dataclasses.dataclass(frozen=True)
class NTMConfig:
    """Sizes of an :class:`NTM`. Defaults are the paper's copy-task setup (Graves et al. 2014, Table 1/2).

    memory_slots ``N`` = 128 and memory_width ``M`` = 20; controller_size = 100 (one LSTM layer);
    shift_range ``S`` = 3 (offsets -1, 0, +1; must be odd, at most N). ``learn_initial_memory``:
    the initial memory is the constant 1e-6 in every cell (a buffer; Collier & Beel 2018 found a
    small constant the most reliable initialisation), or, when True, a parameter starting there.
    """

    input_size: int
    output_size: int
    memory_slots: int = 128
    memory_width: int = 20
    controller_size: int = 100
    controller: Controller = Controller.LSTM
    read_heads: int = 1
    write_heads: int = 1
    shift_range: int = 3
    learn_initial_memory: bool = False

    def __post_init__(self) -> None:
        sizes = ("input_size", "output_size", "memory_slots", "memory_width", "controller_size")
        for name in (*sizes, "read_heads", "write_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInput(f"NTMConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.controller, Controller):
            raise InvalidInput(
                f"NTMConfig.controller must be a Controller ({', '.join(c.name for c in Controller)}), "
                f"got {self.controller!r}"
            )
        s = self.shift_range
        if not isinstance(s, int) or s < 1 or s % 2 == 0 or s > self.memory_slots:
            raise InvalidInput(
                f"NTMConfig.shift_range must be an odd integer in [1, memory_slots={self.memory_slots}] "
                f"(offsets -S//2 .. S//2), got {s!r}"
            )


@dataclasses.dataclass(frozen=True)
class NTMState(MemoryState):
    """The NTM's state between steps.

    memory (B, N, M); read_weights (B, R, N) and write_weights (B, W, N), each row a distribution
    over the slots; reads (B, R, M) the last read vectors; controller: ``(h, c)`` each
    (B, controller_size) for the LSTM, ``()`` for the feed-forward controller.
    """

    memory: Tensor
    read_weights: Tensor
    write_weights: Tensor
    reads: Tensor
    controller: tuple[Tensor, ...]


class NTM(SequenceMemory):
    """A batched Neural Turing Machine: ``x (B, T, input_size) -> y (B, T, output_size)``.

    Head parameters from the controller output ``h`` (Graves 2014 section 3): key ``k`` (linear),
    strength ``beta = softplus``, gate ``g = sigmoid``, shift ``s = softmax`` over S offsets,
    sharpening ``gamma = 1 + softplus``; write heads add erase ``e = sigmoid`` and add ``a`` (linear).

    Learned initial state: the read/write weightings start as ``softmax`` of learned logits (zero
    at init: uniform), the read vectors and the LSTM state as learned vectors (zero at init).
    """

    def __init__(self, config: NTMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        n, m, s = c.memory_slots, c.memory_width, c.shift_range
        self.input_size = c.input_size
        self.output_size = c.output_size
        ctrl_in = c.input_size + c.read_heads * m
        self.controller: nn.Module
        if c.controller is Controller.LSTM:
            self.controller = nn.LSTMCell(ctrl_in, c.controller_size)
            self.h0 = nn.Parameter(torch.zeros(c.controller_size))
            self.c0 = nn.Parameter(torch.zeros(c.controller_size))
        else:
            self.controller = nn.Linear(ctrl_in, c.controller_size)
        self.read_params = nn.Linear(c.controller_size, c.read_heads * (m + s + 3))
        self.write_params = nn.Linear(c.controller_size, c.write_heads * (3 * m + s + 3))
        self.output = nn.Linear(c.controller_size + c.read_heads * m, c.output_size)
        init_memory = torch.full((n, m), 1e-6)
        if c.learn_initial_memory:
            self.memory_init = nn.Parameter(init_memory)
        else:
            self.register_buffer("memory_init", init_memory)
        self.read_weight_logits = nn.Parameter(torch.zeros(c.read_heads, n))
        self.write_weight_logits = nn.Parameter(torch.zeros(c.write_heads, n))
        self.read_init = nn.Parameter(torch.zeros(c.read_heads, m))

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> NTMState:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput(f"batch_size must be an integer >= 1, got {batch_size!r}")
        c = self.config
        b = batch_size

        def expand(t: Tensor) -> Tensor:
            t = t if device is None else t.to(device)
            return t.unsqueeze(0).expand(b, *t.shape)  # (B, ...)

        ctrl: tuple[Tensor, ...] = ()
        if c.controller is Controller.LSTM:
            ctrl = (expand(self.h0), expand(self.c0))  # (B, C) each
        return NTMState(
            memory=expand(self.memory_init),  # (B, N, M)
            read_weights=expand(torch.softmax(self.read_weight_logits, -1)),  # (B, R, N)
            write_weights=expand(torch.softmax(self.write_weight_logits, -1)),  # (B, W, N)
            reads=expand(self.read_init),  # (B, R, M)
            controller=ctrl,
        )

    def _controller(self, inp: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        if self.config.controller is Controller.LSTM:
            h, cell = self.controller(inp, (state[0], state[1]))
            return h, (h, cell)
        return torch.tanh(self.controller(inp)), ()

    def step(self, x: Tensor, state: MemoryState) -> tuple[Tensor, NTMState]:
        state = self._checked(x, state, NTMState)
        c = self.config
        m, s = c.memory_width, c.shift_range
        b = x.shape[0]
        inp = torch.cat([x, state.reads.reshape(b, -1)], dim=-1)  # (B, I + R*M)
        h, ctrl = self._controller(inp, state.controller)  # (B, C)

        p = self.write_params(h).view(b, c.write_heads, 3 * m + s + 3)  # (B, W, 3M + S + 3)
        key, beta, gate, shift, gamma, erase, add = p.split([m, 1, 1, s, 1, m, m], dim=-1)
        write_weights = _ntm_address(
            state.memory,
            key,  # (B, W, M)
            F.softplus(beta.squeeze(-1)),  # (B, W)
            torch.sigmoid(gate.squeeze(-1)),  # (B, W)
            torch.softmax(shift, dim=-1),  # (B, W, S)
            1.0 + F.softplus(gamma.squeeze(-1)),  # (B, W)
            state.write_weights,
        )  # (B, W, N)
        memory = _erase_add_write(state.memory, write_weights, torch.sigmoid(erase), add)  # (B, N, M)

        p = self.read_params(h).view(b, c.read_heads, m + s + 3)  # (B, R, M + S + 3)
        key, beta, gate, shift, gamma = p.split([m, 1, 1, s, 1], dim=-1)
        read_weights = _ntm_address(
            memory,
            key,  # (B, R, M)
            F.softplus(beta.squeeze(-1)),  # (B, R)
            torch.sigmoid(gate.squeeze(-1)),  # (B, R)
            torch.softmax(shift, dim=-1),  # (B, R, S)
            1.0 + F.softplus(gamma.squeeze(-1)),  # (B, R)
            state.read_weights,
        )  # (B, R, N)
        reads = _weighted_read(memory, read_weights)  # (B, R, M)
        y = self.output(torch.cat([h, reads.reshape(b, -1)], dim=-1))  # (B, O)
        return y, NTMState(memory, read_weights, write_weights, reads, ctrl)
