"""DKVMN: the dynamic key-value memory network for knowledge tracing (Zhang et al. 2017).

A static key memory ``M^k`` (N, d_k) holds one latent concept per slot (a parameter); a dynamic value
memory ``M^v_t`` (B, N, d_v) holds the student's mastery of each concept (the state). At step t, for
question ``q_t`` with embedding ``k_t = A q_t``:

- correlation weights ``w_t = softmax(k_t M^k^T)`` (N,);
- read ``r_t = sum_i w_t(i) M^v_t(i)``; summary ``f_t = tanh(W_1 [r_t, k_t] + b_1)``;
  prediction ``p_t = sigmoid(W_2 f_t + b_2)``: the probability that ``q_t`` is answered correctly;
- then write with the (question, response) embedding ``v_t = B (q_t, r_t)``: erase
  ``e_t = sigmoid(E v_t)``, add ``a_t = tanh(D v_t)``,
  ``M^v_{t+1}(i) = M^v_t(i) * (1 - w_t(i) e_t) + w_t(i) a_t``.

``p_t`` is read before ``r_t`` is written, so it depends on ``q_1..q_t`` and ``r_1..r_{t-1}`` only.

Padding convention: question ids are ``1..num_questions``; id ``0`` is padding, anywhere in a
sequence. A padded step leaves the memory unchanged, its response is ignored (any value, e.g. -1)
and its prediction is 0 (mask it out of the loss). Responses at real steps are 0 or 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput
from memfusion.neural.base import MemoryState, SequenceMemory
from memfusion.neural.functional import _erase_add_write, _weighted_read


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclass
class DKVMNConfig:
    """num_questions: ``Q``, question ids are 1..Q (0 = padding). memory_size: ``N`` concepts.
    key_size ``d_k`` / value_size ``d_v`` / summary_size: widths (the paper's ASSISTments setting is
    N=50 with d_k=d_v=50..200). dropout: on the summary ``f_t`` before the prediction (pykt uses 0.2)."""

    num_questions: int
    memory_size: int = 50
    key_size: int = 50
    value_size: int = 200
    summary_size: int = 50
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_questions", "memory_size", "key_size", "value_size", "summary_size"):
            v = getattr(self, name)
            _need(isinstance(v, int) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        _need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class DKVMNState(MemoryState):
    """The dynamic value memory ``M^v`` (B, N, d_v) of a batch of students."""

    value_memory: Tensor


class DKVMN(SequenceMemory):
    """Knowledge tracing with a key-value memory. Input of :meth:`forward`: ``x`` (B, T, 2) integer,
    ``x[..., 0]`` question ids and ``x[..., 1]`` responses; output (B, T, 1) probabilities. The
    same as :meth:`predict` (questions (B, T), responses (B, T)) -> (B, T), which is the usual entry.

    Only the memory recursion loops over time; embeddings, correlation weights, erase and add
    vectors, summaries and predictions are computed for all steps at once.
    """

    input_size = 2
    output_size = 1

    def __init__(self, config: DKVMNConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.key_memory = nn.Parameter(torch.empty(c.memory_size, c.key_size))  # M^k (N, d_k)
        self.initial_value_memory = nn.Parameter(torch.empty(c.memory_size, c.value_size))  # M^v_0 (N, d_v)
        nn.init.kaiming_normal_(self.key_memory)
        nn.init.kaiming_normal_(self.initial_value_memory)
        self.question_embed = nn.Embedding(c.num_questions + 1, c.key_size, padding_idx=0)  # A
        self.interaction_embed = nn.Embedding(2 * c.num_questions + 1, c.value_size, padding_idx=0)  # B
        self.erase = nn.Linear(c.value_size, c.value_size)  # E
        self.add = nn.Linear(c.value_size, c.value_size)  # D
        self.summary = nn.Linear(c.value_size + c.key_size, c.summary_size)  # W_1
        self.predictor = nn.Linear(c.summary_size, 1)  # W_2
        self.dropout = nn.Dropout(c.dropout)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> DKVMNState:
        mv: Tensor = self.initial_value_memory
        if device is not None:
            mv = mv.to(device)
        return DKVMNState(value_memory=mv.unsqueeze(0).expand(batch_size, -1, -1))  # (B, N, d_v)

    def _check(self, questions: Tensor, responses: Tensor, state: DKVMNState | None) -> None:
        c = self.config
        _need(questions.dim() == 2, f"questions must be (B, T), got shape {tuple(questions.shape)}")
        _need(
            tuple(responses.shape) == tuple(questions.shape),
            f"responses must have the shape of questions {tuple(questions.shape)}, got {tuple(responses.shape)}",
        )
        _need(
            not questions.is_floating_point() and not responses.is_floating_point(),
            f"questions and responses must be integer tensors, got {questions.dtype} and {responses.dtype}",
        )
        if questions.numel():
            _need(
                int(questions.min()) >= 0 and int(questions.max()) <= c.num_questions,
                f"question ids must be in 0..{c.num_questions} (0 = padding), "
                f"got {int(questions.min())}..{int(questions.max())}",
            )
            real = questions > 0
            _need(
                bool(((responses[real] == 0) | (responses[real] == 1)).all()),
                "responses must be 0 or 1 at real steps (question id > 0)",
            )
        if state is not None:
            shape = (questions.shape[0], c.memory_size, c.value_size)
            _need(
                tuple(state.value_memory.shape) == shape,
                f"state.value_memory must be (B, N, d_v) = {shape}, got {tuple(state.value_memory.shape)}",
            )

    def _run(self, questions: Tensor, responses: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Unchecked: questions, responses (B, T), memory (B, N, d_v) -> (logits (B, T), final memory)."""
        c = self.config
        real = questions > 0  # (B, T)
        interactions = torch.where(real, questions + c.num_questions * responses.clamp(0, 1), 0)  # (B, T)
        k = self.question_embed(questions)  # (B, T, d_k)
        w = torch.softmax(k @ self.key_memory.T, dim=-1)  # (B, T, N) correlation weights
        v = self.interaction_embed(interactions)  # (B, T, d_v)
        erase = torch.sigmoid(self.erase(v))  # (B, T, d_v)
        add = torch.tanh(self.add(v))  # (B, T, d_v)
        reads = []
        for t in range(questions.shape[1]):
            w_t = w[:, t].unsqueeze(1)  # (B, 1, N): one head
            reads.append(_weighted_read(memory, w_t).squeeze(1))  # (B, d_v), read before the write
            written = _erase_add_write(memory, w_t, erase[:, t].unsqueeze(1), add[:, t].unsqueeze(1))  # (B, N, d_v)
            memory = torch.where(real[:, t, None, None], written, memory)  # padding leaves it unchanged
        r = torch.stack(reads, dim=1) if reads else k.new_zeros(*questions.shape, c.value_size)  # (B, T, d_v)
        f = torch.tanh(self.summary(torch.cat([r, k], dim=-1)))  # (B, T, summary_size)
        logits = self.predictor(self.dropout(f)).squeeze(-1)  # (B, T)
        return logits.masked_fill(~real, 0.0), memory

    def predict_logits(
        self, questions: Tensor, responses: Tensor, state: DKVMNState | None = None
    ) -> tuple[Tensor, DKVMNState]:
        """Like :meth:`predict` but returns the logits (B, T) (0 at padding), for a stable BCE-with-logits."""
        self._check(questions, responses, state)
        if state is None:
            state = self.initial_state(questions.shape[0], questions.device)
        logits, memory = self._run(questions, responses, state.value_memory)
        return logits, DKVMNState(value_memory=memory)

    def predict(
        self, questions: Tensor, responses: Tensor, state: DKVMNState | None = None
    ) -> tuple[Tensor, DKVMNState]:
        """questions (B, T) ids in 0..Q (0 = padding), responses (B, T) in {0, 1} -> (p (B, T), final state).

        ``p[:, t]`` is the probability that question ``t`` is answered correctly given the questions up
        to t and the responses before t; 0 at padded steps.
        """
        logits, state = self.predict_logits(questions, responses, state)
        real = questions > 0
        return torch.sigmoid(logits).masked_fill(~real, 0.0), state

    def step(self, x: Tensor, state: MemoryState) -> tuple[Tensor, DKVMNState]:
        """x (B, 2) = (question id, response) -> (p (B, 1), next state)."""
        if not isinstance(state, DKVMNState):
            raise InvalidInput(f"state must be a DKVMNState, got {type(state).__name__}")
        _need(x.dim() == 2 and x.shape[1] == 2, f"x must be (B, 2) = (question, response), got {tuple(x.shape)}")
        p, next_state = self.predict(x[:, :1], x[:, 1:], state)
        return p, next_state  # (B, 1)

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, DKVMNState]:
        """x (B, T, 2) = (question ids, responses) -> (p (B, T, 1), final state)."""
        _need(
            x.dim() == 3 and x.shape[-1] == 2,
            f"DKVMN expects x of shape (B, T, 2) = (question ids, responses), got {tuple(x.shape)}",
        )
        if state is not None and not isinstance(state, DKVMNState):
            raise InvalidInput(f"state must be a DKVMNState or None, got {type(state).__name__}")
        p, final = self.predict(x[..., 0], x[..., 1], state)
        return p.unsqueeze(-1), final  # (B, T, 1)
