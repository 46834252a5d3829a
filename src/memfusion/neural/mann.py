"""The memory-augmented network with least-recently-used access (Santoro et al. 2016), batched.

One step (paper section 3.1; tristandeleu/ntm-one-shot for the details the paper leaves open):

1. the LSTM controller reads ``[x_t, r_{t-1}]``; each of the H heads emits a key ``k_t = tanh(W h)``
   and an interpolation logit ``alpha``;
2. least-used weighting ``w^lu_{t-1}`` from the previous usage: 1 on the H least-used slots;
3. write weights ``w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``;
4. the single least-used slot (by ``w^u_{t-1}``) is zeroed, then ``M_t = M_{t-1} + sum_h w^w_h k_h^T``
   (the paper writes the key itself);
5. read weights ``w^r_t = softmax(beta * cosine(k_t, M_t))``, reads ``r_t = w^r_t M_t``;
6. usage ``w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t``; output ``y_t = W [h_t, r_t]`` (raw logits).
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
    _lrua_least_used,
    _lrua_usage,
    _lrua_write_weights,
    _weighted_read,
)


@dataclasses.dataclass(frozen=True)
class MANNConfig:
    """Sizes of a :class:`MANN`. Defaults are the paper's Omniglot model (Santoro et al. 2016).

    memory_slots ``N`` = 128 of width ``M`` = 40, an LSTM controller of 200 units, 4 read heads
    (each also writes, so the least-used weighting marks the 4 least-used slots), usage decay
    ``gamma`` = 0.95 (as ntm-one-shot). ``learn_key_strength``: the paper's read is
    ``softmax(cosine)`` (strength 1); when True each head also emits ``beta = 1 + softplus``.
    """

    input_size: int
    output_size: int
    memory_slots: int = 128
    memory_width: int = 40
    controller_size: int = 200
    read_heads: int = 4
    usage_decay: float = 0.95
    learn_key_strength: bool = False

    def __post_init__(self) -> None:
        sizes = ("input_size", "output_size", "memory_slots", "memory_width", "controller_size", "read_heads")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInput(f"MANNConfig.{name} must be an integer >= 1, got {value!r}")
        if self.read_heads > self.memory_slots:
            raise InvalidInput(
                f"MANNConfig.read_heads ({self.read_heads}) must be <= memory_slots ({self.memory_slots}): "
                "the least-used weighting marks one slot per head"
            )
        decay = self.usage_decay
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 <= decay <= 1.0:
            raise InvalidInput(f"MANNConfig.usage_decay (gamma) must be in [0, 1], got {self.usage_decay!r}")


@dataclasses.dataclass(frozen=True)
class MANNState(MemoryState):
    """The MANN's state between steps.

    memory (B, N, M); usage (B, N) >= 0 (bounded by ``2H / (1 - gamma)``); read_weights (B, H, N)
    each row a distribution (all zeros initially); reads (B, H, M); controller ``(h, c)`` each
    (B, C). The initial memory is the constant 1e-6, every other field zero.
    """

    memory: Tensor
    usage: Tensor
    read_weights: Tensor
    reads: Tensor
    controller: tuple[Tensor, ...]


class MANN(SequenceMemory):
    """A batched MANN with LRUA memory: ``x (B, T, input_size) -> y (B, T, output_size)``."""

    def __init__(self, config: MANNConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.input_size = c.input_size
        self.output_size = c.output_size
        self.controller = nn.LSTMCell(c.input_size + c.read_heads * c.memory_width, c.controller_size)
        self._per_head = c.memory_width + 1 + int(c.learn_key_strength)  # key, alpha[, beta]
        self.head_params = nn.Linear(c.controller_size, c.read_heads * self._per_head)
        self.output = nn.Linear(c.controller_size + c.read_heads * c.memory_width, c.output_size)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> MANNState:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput(f"batch_size must be an integer >= 1, got {batch_size!r}")
        c = self.config
        b, n, m, r = batch_size, c.memory_slots, c.memory_width, c.read_heads
        ref = self.output.weight
        dev = ref.device if device is None else device

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=ref.dtype, device=dev)

        return MANNState(
            memory=torch.full((b, n, m), 1e-6, dtype=ref.dtype, device=dev),
            usage=zeros(b, n),
            read_weights=zeros(b, r, n),
            reads=zeros(b, r, m),
            controller=(zeros(b, c.controller_size), zeros(b, c.controller_size)),
        )

    def step(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MANNState]:
        state = self._checked(x, state, MANNState)
        c = self.config
        r, m = c.read_heads, c.memory_width
        b = x.shape[0]
        inp = torch.cat([x, state.reads.reshape(b, -1)], dim=-1)  # (B, I + H*M)
        h, cell = self.controller(inp, (state.controller[0], state.controller[1]))  # (B, C)
        p = self.head_params(h).view(b, r, self._per_head)  # (B, H, M + 1 [+ 1])
        keys = torch.tanh(p[..., :m])  # (B, H, M)
        alpha = p[..., m]  # (B, H)
        beta = 1.0 + F.softplus(p[..., m + 1]) if c.learn_key_strength else torch.ones_like(alpha)  # (B, H)

        least_used = _lrua_least_used(state.usage, r)  # (B, N), w^lu_{t-1}
        write_weights = _lrua_write_weights(alpha, state.read_weights, least_used)  # (B, H, N)
        keep = 1.0 - _lrua_least_used(state.usage, 1)  # (B, N): 0 at the least-used slot
        memory = state.memory * keep.unsqueeze(-1) + torch.einsum("bhn,bhm->bnm", write_weights, keys)  # (B, N, M)
        read_weights = _content_address(memory, keys, beta)  # (B, H, N)
        reads = _weighted_read(memory, read_weights)  # (B, H, M)
        usage = _lrua_usage(state.usage, read_weights, write_weights, c.usage_decay)  # (B, N)
        y = self.output(torch.cat([h, reads.reshape(b, -1)], dim=-1))  # (B, O)
        return y, MANNState(memory, usage, read_weights, reads, (h, cell))
