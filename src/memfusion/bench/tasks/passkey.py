"""Passkey retrieval for segment-local models: recall digits seen more than a window earlier.

A sequence of ``n_segments * window`` tokens over a small vocabulary (digits ``0..9``, ``n_filler``
filler tokens, a ``KEY`` and a ``QUERY`` marker)::

    filler ... KEY d1 .. dL filler ...  | filler ... |  ... filler QUERY d1 .. dL
    ^ passkey in an early segment                      ^ question: the last L + 1 tokens

The task is next-token prediction on the answer only: at the ``QUERY`` marker predict ``d1``, at
``d(j)`` predict ``d(j+1)``. Placement:

- *beyond* the window (the evaluation case): the passkey lies in a segment before the last one
  and at in-segment offset ``p in [0, window - 2 - 2L]``, so the question's segment holds no passkey
  token and ``query_pos - (key_pos + L) > window``: segment-local attention cannot see it;
- *near* (optional, for training): the passkey lies in the question's segment, before it.

Digits appear nowhere else; filler tokens are uniform. Everything is drawn from one seeded
``torch.Generator``: the same seed gives the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memfusion.errors import InvalidInput

IGNORE = -100
"""The target outside the answer (``torch.nn.functional.cross_entropy``'s default ignore index)."""


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclass(frozen=True)
class PasskeySpec:
    """Sequence layout. Token ids: digits ``0..9``, fillers ``10 .. 10 + n_filler - 1``, then
    ``KEY`` and ``QUERY``."""

    window: int = 32
    n_segments: int = 3
    n_digits: int = 5
    n_filler: int = 8

    def __post_init__(self) -> None:
        _need(1 <= self.n_digits <= 16, f"n_digits must be in [1, 16], got {self.n_digits}")
        _need(
            self.window >= 2 * self.n_digits + 2,
            f"window must be >= 2 * n_digits + 2 = {2 * self.n_digits + 2} to hold the passkey and the question "
            f"in one segment, got {self.window}",
        )
        _need(
            self.n_segments >= 2, f"n_segments must be >= 2 (a passkey segment and a question), got {self.n_segments}"
        )
        _need(self.n_filler >= 1, f"n_filler must be >= 1, got {self.n_filler}")

    @property
    def key_token(self) -> int:
        return 10 + self.n_filler

    @property
    def query_token(self) -> int:
        return 11 + self.n_filler

    @property
    def vocab_size(self) -> int:
        return 12 + self.n_filler

    @property
    def length(self) -> int:
        """T, tokens per sequence."""
        return self.window * self.n_segments

    @property
    def query_pos(self) -> int:
        """Position of the ``QUERY`` marker; the answer digits follow it to the end."""
        return self.length - 1 - self.n_digits

    @property
    def max_offset(self) -> int:
        """Largest in-segment offset of the ``KEY`` marker."""
        return self.window - 2 - 2 * self.n_digits


@dataclass(frozen=True)
class PasskeyBatch:
    """``ids`` (B, T): the sequences; ``targets`` (B, T): the next token on the answer, ``IGNORE``
    elsewhere; ``answer_mask`` (B, T): where ``targets`` is a digit (L positions per row:
    ``query_pos .. T - 2``); ``passkeys`` (B, L); ``key_pos`` (B,): position of ``KEY`` (digits at
    ``key_pos + 1 .. key_pos + L``); ``beyond`` (B,): whether the passkey is in an earlier segment."""

    ids: Tensor
    targets: Tensor
    answer_mask: Tensor
    passkeys: Tensor
    key_pos: Tensor
    beyond: Tensor


def passkey_batch(
    spec: PasskeySpec, batch_size: int, generator: torch.Generator | int, near_fraction: float = 0.0
) -> PasskeyBatch:
    """``batch_size`` sequences; each has its passkey in the question's segment with probability
    ``near_fraction``, else beyond the window. ``generator``: a seed or a
    ``torch.Generator`` (advanced by the call)."""
    _need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    _need(0.0 <= near_fraction <= 1.0, f"near_fraction must be in [0, 1], got {near_fraction}")
    g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    b, t, w, n = batch_size, spec.length, spec.window, spec.n_digits
    ids = torch.randint(10, 10 + spec.n_filler, (b, t), generator=g)  # (B, T) filler
    passkeys = torch.randint(0, 10, (b, n), generator=g)  # (B, L)
    beyond = torch.rand(b, generator=g) >= near_fraction  # (B,)
    far_segment = torch.randint(0, spec.n_segments - 1, (b,), generator=g)  # (B,)
    segment = torch.where(beyond, far_segment, torch.full_like(far_segment, spec.n_segments - 1))  # (B,)
    key_pos = segment * w + torch.randint(0, spec.max_offset + 1, (b,), generator=g)  # (B,)
    rows = torch.arange(b)[:, None]  # (B, 1)
    ids[rows[:, 0], key_pos] = spec.key_token
    ids[rows, key_pos[:, None] + 1 + torch.arange(n)] = passkeys  # (B, L) digits after KEY
    q = spec.query_pos
    ids[:, q] = spec.query_token
    ids[:, q + 1 :] = passkeys
    targets = torch.full_like(ids, IGNORE)  # (B, T)
    targets[:, q : t - 1] = passkeys
    answer_mask = targets != IGNORE  # (B, T)
    return PasskeyBatch(ids, targets, answer_mask, passkeys, key_pos, beyond)


@dataclass(frozen=True)
class PasskeyScore:
    """``exact_match``: fraction of samples with every digit right; ``digit_accuracy``: fraction of
    digits right; ``n``: samples. Chance is ``0.1 ** L`` and ``0.1``."""

    exact_match: float
    digit_accuracy: float
    n: int


def score_passkey(predicted: Tensor, passkeys: Tensor) -> PasskeyScore:
    """Score predicted digits (B, L) against the passkeys (B, L)."""
    _need(
        predicted.shape == passkeys.shape and passkeys.dim() == 2 and passkeys.shape[0] >= 1,
        f"predicted {tuple(predicted.shape)} and passkeys {tuple(passkeys.shape)} must both be (B, L) with B >= 1",
    )
    right = predicted == passkeys  # (B, L)
    return PasskeyScore(
        exact_match=float(right.all(dim=1).float().mean()),
        digit_accuracy=float(right.float().mean()),
        n=int(passkeys.shape[0]),
    )


__all__ = ["IGNORE", "PasskeyBatch", "PasskeyScore", "PasskeySpec", "passkey_batch", "score_passkey"]
