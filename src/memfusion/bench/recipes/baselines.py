"""The memory-less baselines the memories are compared with: an LSTM sequence model and DKT.

- :class:`LSTMBaseline`: ``nn.LSTM`` (``layers`` x ``hidden_size``) then one linear output layer, the
  same output layer the memories have (``y_t = W h_t + b``, raw logits). It follows the
  :class:`~memfusion.neural.base.SequenceMemory` calling convention ``x (B, T, I) -> (y (B, T, O), state)``
  so a recipe trains it exactly as it trains an NTM or a MANN (the NTM paper's baseline: 3 x 256).
- :class:`DKT`: deep knowledge tracing (Piech et al. 2015): an LSTM over the interactions
  ``(q_t, r_t)``; the prediction for step ``t`` is read from the state after steps ``< t`` and the
  output unit of question ``q_t``, so it sees the same information as DKVMN's ``p_t``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput


def _positive(owner: str, **values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidInput(f"{owner}.{name} must be an integer >= 1, got {v!r}")


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    """Sizes of an :class:`LSTMBaseline`."""

    input_size: int
    output_size: int
    hidden_size: int = 256
    layers: int = 3

    def __post_init__(self) -> None:
        _positive(
            "LSTMConfig",
            input_size=self.input_size,
            output_size=self.output_size,
            hidden_size=self.hidden_size,
            layers=self.layers,
        )


class LSTMBaseline(nn.Module):
    """A stacked LSTM with a linear output layer: ``x (B, T, input_size) -> (y (B, T, output_size), (h, c))``."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        self.output_size = config.output_size
        self.lstm = nn.LSTM(config.input_size, config.hidden_size, config.layers, batch_first=True)
        self.output = nn.Linear(config.hidden_size, config.output_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise InvalidInput(f"LSTMBaseline expects input (B, T, {self.input_size}), got {tuple(x.shape)}")
        h, state = self.lstm(x)  # (B, T, hidden)
        return self.output(h), state  # (B, T, O)


@dataclasses.dataclass(frozen=True)
class DKTConfig:
    """Sizes of a :class:`DKT`: question ids are ``1 .. num_questions`` (0 = padding), as DKVMN's."""

    num_questions: int
    hidden_size: int = 200
    embed_size: int = 200

    def __post_init__(self) -> None:
        _positive(
            "DKTConfig", num_questions=self.num_questions, hidden_size=self.hidden_size, embed_size=self.embed_size
        )


class DKT(nn.Module):
    """Deep knowledge tracing with an LSTM.

    The interaction ``(q_t, r_t)`` is embedded as one of ``2 Q`` rows (a learned linear map of its
    one-hot code, as the paper's input layer; row 0 = padding); the LSTM runs over the interactions;
    the logit of step ``t`` is ``W h_{t-1} + b`` at output unit ``q_t`` (``h_{-1} = 0``), so it depends
    on ``q_1..q_t`` and ``r_1..r_{t-1}`` only.
    """

    def __init__(self, config: DKTConfig) -> None:
        super().__init__()
        self.config = config
        q = config.num_questions
        self.embed = nn.Embedding(2 * q + 1, config.embed_size, padding_idx=0)
        self.lstm = nn.LSTM(config.embed_size, config.hidden_size, batch_first=True)
        self.output = nn.Linear(config.hidden_size, q)

    def predict_logits(self, questions: Tensor, responses: Tensor) -> Tensor:
        """questions (B, T) ids in 0..Q (0 = padding), responses (B, T) in {0, 1} -> logits (B, T), 0 at padding."""
        q = self.config.num_questions
        if questions.dim() != 2 or questions.shape != responses.shape:
            raise InvalidInput(
                f"questions and responses must both be (B, T), got {tuple(questions.shape)}, {tuple(responses.shape)}"
            )
        if questions.numel() and (int(questions.min()) < 0 or int(questions.max()) > q):
            raise InvalidInput(f"question ids must be in 0..{q} (0 = padding)")
        real = questions > 0  # (B, T)
        interactions = torch.where(real, questions + q * responses.clamp(0, 1), 0)  # (B, T) in 0..2Q
        h, _ = self.lstm(self.embed(interactions))  # (B, T, hidden)
        before = torch.cat([h.new_zeros(h.shape[0], 1, h.shape[2]), h[:, :-1]], dim=1)  # (B, T, hidden) h_{t-1}
        logits = self.output(before)  # (B, T, Q)
        picked = logits.gather(2, (questions - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
        return picked.masked_fill(~real, 0.0)
