"""KV-MemNN: the multi-hop key-value memory network (Miller et al. 2016, "Key-Value Memory Networks for
Directly Reading Documents").

Memory slots are (key, value) pairs ``(k_i, v_i)`` preselected per question ("key hashing" is the
caller's job). With one embedding ``A`` for questions, keys and values (the paper's choice),
``q_1 = A Phi_X(x)`` and for each hop ``j = 1..H``:

- key addressing ``p_i = softmax_i(q_j . A Phi_K(k_i))`` over the real slots,
- value reading ``o = sum_i p_i A Phi_V(v_i)``,
- query update ``q_{j+1} = R_j (q_j + o)``.

Answers are scored against candidates ``y``: ``logits = q_{H+1} . B Phi_Y(y)``.

Two input kinds, fixed by the config: token ids (bag of words: ``Phi`` is a count vector, so
``A Phi(x)`` is the sum of the token embeddings; id 0 is padding and embeds to zero), or features
(``Phi(x)`` given as a vector and ``A`` a linear map). A slot mask (B, N) (True = a real slot)
excludes padding slots; a question with no real slot reads ``o = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


def _masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dimension that never returns NaN: overflowed logits are clamped to the
    largest finite value, masked entries weigh exactly 0 and an all-masked row weighs all 0."""
    big = torch.finfo(logits.dtype).max
    logits = logits.clamp(-big, big)
    if mask is None:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.masked_fill(~mask, -big), dim=-1) * mask


def key_value_read(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One key addressing and value reading: ``p = softmax(keys q)``, ``o = sum_i p_i values_i``.

    query (B, d), keys (B, N, d), values (B, N, d) (all already embedded), mask (B, N) bool (True = a
    real slot). Returns (o (B, d), p (B, N)); masked slots get ``p_i = 0``.
    """
    p = _masked_softmax(torch.einsum("bnd,bd->bn", keys, query), mask)  # (B, N)
    return torch.einsum("bn,bnd->bd", p, values), p  # (B, d)


@dataclass
class KVMemNNConfig:
    """embed_dim: ``d``. hops: ``H`` (the paper uses 2). Exactly one of vocab_size (token-id input: ids
    in 0..vocab_size-1, 0 = padding) and feature_dim (feature input of this width) is set.
    answer_vocab_size / answer_feature_dim: the candidates' input kind for :meth:`KVMemNN.score`
    (default: the same as the inputs)."""

    embed_dim: int = 64
    hops: int = 2
    vocab_size: int | None = None
    feature_dim: int | None = None
    answer_vocab_size: int | None = None
    answer_feature_dim: int | None = None

    def __post_init__(self) -> None:
        _need(self.embed_dim >= 1, f"embed_dim must be >= 1, got {self.embed_dim}")
        _need(self.hops >= 1, f"hops must be >= 1, got {self.hops}")
        _need(
            (self.vocab_size is None) != (self.feature_dim is None),
            "set exactly one of vocab_size (token-id input) and feature_dim (feature input), "
            f"got vocab_size={self.vocab_size}, feature_dim={self.feature_dim}",
        )
        _need(
            self.answer_vocab_size is None or self.answer_feature_dim is None,
            "set at most one of answer_vocab_size and answer_feature_dim",
        )
        for name in ("vocab_size", "answer_vocab_size"):
            v = getattr(self, name)
            _need(v is None or v >= 2, f"{name} must be >= 2 (id 0 is padding), got {v}")
        for name in ("feature_dim", "answer_feature_dim"):
            v = getattr(self, name)
            _need(v is None or v >= 1, f"{name} must be >= 1, got {v}")


class KVMemNNOutput(NamedTuple):
    """query: the final controller state ``q_{H+1}`` (B, d); attention: ``p`` of every hop (B, H, N)."""

    query: Tensor
    attention: Tensor


class _BagEmbedding(nn.Module):
    """``A Phi(x)``: token ids (..., L) -> the sum of their embeddings (..., d) (id 0 embeds to 0), or
    features (..., F) -> a linear map without bias (..., d)."""

    def __init__(self, vocab_size: int | None, feature_dim: int | None, dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.feature_dim = feature_dim
        self.table: nn.Module
        if vocab_size is not None:
            self.table = nn.Embedding(vocab_size, dim, padding_idx=0)
        elif feature_dim is not None:
            self.table = nn.Linear(feature_dim, dim, bias=False)
        else:
            raise InvalidInput("set exactly one of vocab_size (token-id input) and feature_dim (feature input)")

    def check(self, x: Tensor, name: str, lead: str) -> None:
        """Validate x (``lead`` + (L,) ids or (F,) features)."""
        if self.vocab_size is not None:
            _need(
                not x.is_floating_point() and not x.is_complex(),
                f"{name} must hold integer token ids {lead + ' L'}, got {x.dtype}",
            )
            if x.numel():
                _need(
                    int(x.min()) >= 0 and int(x.max()) < self.vocab_size,
                    f"{name} token ids must be in 0..{self.vocab_size - 1} (0 = padding), "
                    f"got {int(x.min())}..{int(x.max())}",
                )
        else:
            _need(x.is_floating_point(), f"{name} must hold float features {lead + ' F'}, got {x.dtype}")
            _need(
                x.shape[-1] == self.feature_dim,
                f"{name} must have feature width {self.feature_dim} as its last dimension, got {tuple(x.shape)}",
            )
            _need(bool(torch.isfinite(x).all()), f"{name} contains NaN or inf")

    def forward(self, x: Tensor) -> Tensor:
        if self.vocab_size is not None:
            return self.table(x).sum(-2)  # (..., L, d) -> (..., d)
        return self.table(x)  # (..., d)


class KVMemNN(nn.Module):
    """The key-value memory network. The module holds the parameters ``A`` (shared by questions, keys
    and values), ``R_1..R_H`` (d x d) and the answer embedding ``B``; the memory is an input.

    Shapes (token ids / features): query (B, Lq) / (B, F); keys (B, N, Lk) / (B, N, F); values
    (B, N, Lv) / (B, N, F); mask (B, N) bool. The batch is never looped.
    """

    def __init__(self, config: KVMemNNConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = _BagEmbedding(c.vocab_size, c.feature_dim, c.embed_dim)  # A
        self.hop_maps = nn.ModuleList(nn.Linear(c.embed_dim, c.embed_dim, bias=False) for _ in range(c.hops))  # R_j
        if c.answer_vocab_size is None and c.answer_feature_dim is None:
            self.answer_embed = _BagEmbedding(c.vocab_size, c.feature_dim, c.embed_dim)  # B
        else:
            self.answer_embed = _BagEmbedding(c.answer_vocab_size, c.answer_feature_dim, c.embed_dim)  # B

    def _check(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> None:
        ids = self.config.vocab_size is not None
        _need(query.dim() == 2, f"query must be (B, {'Lq' if ids else 'F'}), got shape {tuple(query.shape)}")
        b = query.shape[0]
        _need(keys.dim() == 3, f"keys must be (B, N, {'Lk' if ids else 'F'}), got shape {tuple(keys.shape)}")
        _need(values.dim() == 3, f"values must be (B, N, {'Lv' if ids else 'F'}), got shape {tuple(values.shape)}")
        _need(keys.shape[0] == b and values.shape[0] == b, f"keys and values must have the query's batch {b}")
        n = keys.shape[1]
        _need(n > 0, "the memory is empty (N = 0 slots): give at least one key-value slot")
        _need(values.shape[1] == n, f"keys have {n} slots but values have {values.shape[1]}")
        self.embed.check(query, "query", "(B,")
        self.embed.check(keys, "keys", "(B, N,")
        self.embed.check(values, "values", "(B, N,")
        if mask is not None:
            _need(mask.dtype == torch.bool, f"mask must be a bool tensor (True = a real slot), got {mask.dtype}")
            _need(tuple(mask.shape) == (b, n), f"mask must be (B, N) = {(b, n)}, got {tuple(mask.shape)}")

    def hop(self, j: int, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Hop ``j`` (0-based) on embedded inputs: q (B, d), keys, values (B, N, d) -> (R_j (q + o), p (B, N))."""
        o, p = key_value_read(q, keys, values, mask)  # (B, d), (B, N)
        return self.hop_maps[j](q + o), p

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> KVMemNNOutput:
        """Run the H hops; returns the final query ``q_{H+1}`` (B, d) and each hop's attention (B, H, N)."""
        self._check(query, keys, values, mask)
        q = self.embed(query)  # (B, d)
        k = self.embed(keys)  # (B, N, d)
        v = self.embed(values)  # (B, N, d)
        attention = []
        for j in range(self.config.hops):
            q, p = self.hop(j, q, k, v, mask)
            attention.append(p)
        return KVMemNNOutput(query=q, attention=torch.stack(attention, dim=1))  # (B, H, N)

    def score(self, query: Tensor, candidates: Tensor) -> Tensor:
        """Answer logits ``q . B Phi_Y(y)``: query (B, d) (the final ``q_{H+1}``); candidates shared by
        the batch (C, Ly) / (C, F) or per question (B, C, Ly) / (B, C, F). Returns (B, C)."""
        _need(
            query.dim() == 2 and query.shape[1] == self.config.embed_dim,
            f"query must be (B, {self.config.embed_dim}), got {tuple(query.shape)}",
        )
        _need(candidates.dim() in (2, 3), f"candidates must be (C, .) or (B, C, .), got {tuple(candidates.shape)}")
        _need(candidates.shape[-2] > 0, "there are no candidates (C = 0)")
        shared = candidates.dim() == 2
        _need(
            shared or candidates.shape[0] == query.shape[0],
            f"per-question candidates must have the query's batch {query.shape[0]}, got {candidates.shape[0]}",
        )
        self.answer_embed.check(candidates, "candidates", "(C," if shared else "(B, C,")
        y = self.answer_embed(candidates)  # (C, d) or (B, C, d)
        if shared:
            return query @ y.T  # (B, C)
        return torch.einsum("bd,bcd->bc", query, y)  # (B, C)
