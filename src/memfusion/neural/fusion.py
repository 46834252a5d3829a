"""Attention over the local context fused with an external memory of past (key, value) pairs.

:class:`MemoryAugmentedAttention` is the kNN-augmented attention layer of Memorizing Transformers
(Wu et al. 2022), also the memory-fusion layer of LongMem (Wang et al. 2023): per head ``h``,

- ``local_h``: causal softmax attention over the current segment (the local window);
- ``mem_h``: attention over the top-k (key, value) pairs that a *retriever* finds in an external
  memory of pairs written by earlier segments;
- output ``o_h = g_h * mem_h + (1 - g_h) * local_h`` with the learned per-head gate
  ``g_h = sigmoid(b_h)``; the heads are concatenated and projected as in any attention layer.

The memory is a :class:`FusionMemory`, passed in and returned out explicitly. The current
segment first reads the memory (which holds only *earlier* segments, so the layer stays causal),
then its own (key, value) pairs are appended, detached: no gradient flows into the past, as in the
paper. The memory is bounded: beyond ``capacity`` pairs the oldest are evicted first (FIFO).

Retrievers (:data:`RETRIEVERS`, selected by name in :class:`FusionConfig`) share one signature,
``query (B, T, D), keys (B, N, D), values (B, N, D), k -> (B, T, D)``:

- ``"knn"``: exact inner-product top-k (brute force), softmax over the k scaled scores;
- ``"dnd"``: the k nearest keys in Euclidean distance, weighted by the Differentiable Neural
  Dictionary's kernel ``w_i = k(q, h_i) / sum_j k(q, h_j)``, ``k(q, h) = 1 / (||q - h||^2 + delta)``;
- ``"hopfield"``: the top-k keys as stored patterns; the query is updated ``steps`` times by the
  modern Hopfield rule ``xi <- K^T softmax(beta K xi)`` and read out as ``softmax(beta K xi)^T V``.

Symbols: ``B`` batch, ``T`` segment length, ``C`` model width, ``H`` heads, ``D = C / H`` head width,
``N`` stored pairs, ``k`` retrieved pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memfusion.errors import InvalidInput
from memfusion.neural.base import MemoryState
from memfusion.neural.functional import dnd_kernel, hopfield_retrieve


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


# --------------------------------------------------------------------------------------------
# Retrievers
# --------------------------------------------------------------------------------------------


class Retriever(Protocol):
    """Reads k pairs of a memory for every query: ``(B, T, D), (B, N, D), (B, N, D), k -> (B, T, D)``.

    ``1 <= k <= N``. Keys and values are used as given (the layer passes detached memories);
    gradients flow to the query.
    """

    def __call__(self, query: Tensor, keys: Tensor, values: Tensor, k: int) -> Tensor: ...


def _check_read(query: Tensor, keys: Tensor, values: Tensor, k: int) -> None:
    _need(keys.dim() == 3, f"keys must be (B, N, D), got shape {tuple(keys.shape)}")
    _need(
        values.shape == keys.shape,
        f"values must have the keys' shape {tuple(keys.shape)}, got {tuple(values.shape)}",
    )
    _need(
        query.dim() == 3 and query.shape[0] == keys.shape[0] and query.shape[2] == keys.shape[2],
        f"query must be (B, T, D) with B = {keys.shape[0]}, D = {keys.shape[2]}, got {tuple(query.shape)}",
    )
    _need(keys.shape[1] > 0, "the memory is empty (N = 0): write at least one (key, value) pair before reading")
    _need(1 <= k <= keys.shape[1], f"k must be between 1 and the number of stored pairs N = {keys.shape[1]}, got {k}")


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of x (B, N, D) at idx (B, T, k) -> (B, T, k, D)."""
    b, n, d = x.shape
    offset = (torch.arange(b, device=idx.device) * n).view(b, 1, 1)  # (B, 1, 1)
    return x.reshape(b * n, d)[idx + offset]  # (B, T, k, D)


@dataclass(frozen=True)
class KnnRetriever:
    """Exact inner-product top-k (brute force over all N keys), then softmax over ``scale * q.k``.

    With ``k = N`` this is dense softmax attention over the whole memory.
    """

    scale: float

    def __call__(self, query: Tensor, keys: Tensor, values: Tensor, k: int) -> Tensor:
        _check_read(query, keys, values, k)
        scores = torch.einsum("btd,bnd->btn", query, keys) * self.scale  # (B, T, N)
        top, idx = scores.topk(k, dim=-1)  # (B, T, k)
        weights = torch.softmax(top, dim=-1)  # (B, T, k)
        return torch.einsum("btk,btkd->btd", weights, _gather(values, idx))  # (B, T, D)


@dataclass(frozen=True)
class DndRetriever:
    """The DND read (Pritzel et al. 2017): k nearest keys in Euclidean distance, inverse-distance
    kernel weights normalised over those k (:func:`memfusion.neural.functional.dnd_kernel`)."""

    delta: float = 1e-3

    def __call__(self, query: Tensor, keys: Tensor, values: Tensor, k: int) -> Tensor:
        _check_read(query, keys, values, k)
        b, t, d = query.shape
        with torch.no_grad():  # only the choice of neighbours; the weights below carry the gradient
            dist = torch.cdist(query, keys)  # (B, T, N)
            idx = dist.topk(k, dim=-1, largest=False).indices  # (B, T, k)
        near_keys = _gather(keys, idx)  # (B, T, k, D)
        kernel = dnd_kernel(query.reshape(b * t, d), near_keys.reshape(b * t, k, d), self.delta)  # (B*T, k)
        weights = (kernel / kernel.sum(-1, keepdim=True)).view(b, t, k)  # (B, T, k)
        return torch.einsum("btk,btkd->btd", weights, _gather(values, idx))  # (B, T, D)


@dataclass(frozen=True)
class HopfieldRetriever:
    """Modern Hopfield retrieval (Ramsauer et al. 2020) over the top-k keys by inner product.

    The stored patterns are the k keys ``K``; the state ``xi`` starts at the query and takes
    ``steps`` updates ``xi <- K^T softmax(beta K xi)`` (:func:`hopfield_retrieve`); the output is
    ``V^T softmax(beta K xi)``. ``steps = 0`` is softmax attention with scale ``beta``.
    """

    beta: float
    steps: int = 1

    def __call__(self, query: Tensor, keys: Tensor, values: Tensor, k: int) -> Tensor:
        _check_read(query, keys, values, k)
        b, t, d = query.shape
        with torch.no_grad():
            idx = torch.einsum("btd,bnd->btn", query, keys).topk(k, dim=-1).indices  # (B, T, k)
        near_keys = _gather(keys, idx)  # (B, T, k, D)
        xi = query
        if self.steps > 0:
            xi = hopfield_retrieve(near_keys.reshape(b * t, k, d), query.reshape(b * t, d), self.beta, self.steps)
            xi = xi.view(b, t, d)  # (B, T, D)
        weights = torch.softmax(self.beta * torch.einsum("btkd,btd->btk", near_keys, xi), dim=-1)  # (B, T, k)
        return torch.einsum("btk,btkd->btd", weights, _gather(values, idx))  # (B, T, D)


def _knn(config: FusionConfig) -> Retriever:
    return KnnRetriever(scale=config.d_head**-0.5)


def _dnd(config: FusionConfig) -> Retriever:
    return DndRetriever(delta=config.dnd_delta)


def _hopfield(config: FusionConfig) -> Retriever:
    beta = config.hopfield_beta if config.hopfield_beta is not None else config.d_head**-0.5
    return HopfieldRetriever(beta=beta, steps=config.hopfield_steps)


RETRIEVERS: dict[str, Callable[[FusionConfig], Retriever]] = {"knn": _knn, "dnd": _dnd, "hopfield": _hopfield}
"""Retriever names -> factories from the layer's config: the one place the name becomes a retriever."""


# --------------------------------------------------------------------------------------------
# Configuration and memory state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionConfig:
    """The attention layer and its memory.

    ``top_k``: pairs retrieved per query and head (``None``: every stored pair); while the memory
    holds fewer than ``top_k`` pairs, all of them are read. ``capacity``: pairs kept per batch
    element and head (FIFO beyond). ``gate_init``: initial gate bias ``b_h`` (0 gives ``g_h = 0.5``,
    the memory and the local context weighted equally). ``rotary``: rotary position embedding
    (RoPE) on the local attention's queries and keys by position within the segment; the memory
    stores position-free keys and is read with position-free queries (as Memorizing Transformers,
    which has no position bias on the memory). ``hopfield_beta``: ``None`` means ``1 / sqrt(D)``.
    """

    d_model: int = 64
    n_heads: int = 4
    top_k: int | None = 8
    capacity: int = 1024
    retriever: str = "knn"
    gate_init: float = 0.0
    rotary: bool = False
    rotary_base: float = 10000.0
    dnd_delta: float = 1e-3
    hopfield_beta: float | None = None
    hopfield_steps: int = 1

    def __post_init__(self) -> None:
        _need(self.n_heads >= 1, f"n_heads must be >= 1, got {self.n_heads}")
        _need(
            self.d_model >= 1 and self.d_model % self.n_heads == 0,
            f"d_model must be a positive multiple of n_heads = {self.n_heads}, got {self.d_model}",
        )
        _need(not self.rotary or self.d_head % 2 == 0, f"rotary needs an even head width, got {self.d_head}")
        _need(self.capacity >= 1, f"capacity must be >= 1 pair, got {self.capacity}")
        _need(
            self.top_k is None or 1 <= self.top_k <= self.capacity,
            f"top_k must be None (all pairs) or between 1 and capacity = {self.capacity}, got {self.top_k}",
        )
        _need(
            self.retriever in RETRIEVERS,
            f"unknown retriever {self.retriever!r}; valid retrievers: {', '.join(sorted(RETRIEVERS))}",
        )
        _need(math.isfinite(self.gate_init), f"gate_init must be finite, got {self.gate_init}")
        _need(self.rotary_base > 1, f"rotary_base must be > 1, got {self.rotary_base}")
        _need(self.dnd_delta > 0, f"dnd_delta must be > 0, got {self.dnd_delta}")
        _need(
            self.hopfield_beta is None or self.hopfield_beta > 0,
            f"hopfield_beta must be None (1/sqrt(D)) or > 0, got {self.hopfield_beta}",
        )
        _need(self.hopfield_steps >= 0, f"hopfield_steps must be >= 0, got {self.hopfield_steps}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class FusionMemory(MemoryState):
    """The external memory of one layer: keys and values (B, H, N, D), oldest pair first.

    Invariants: ``keys.shape == values.shape``; ``0 <= N <= capacity``; every batch element holds
    the same number of pairs (each segment appends T pairs to all of them); tensors are detached.
    """

    keys: Tensor
    values: Tensor

    @property
    def size(self) -> int:
        """N, the number of stored pairs per batch element and head."""
        return int(self.keys.shape[2])


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _rotate(x: Tensor, base: float) -> Tensor:
    """RoPE by position 0..T-1 on x (B, H, T, D), pairs (i, i + D/2) rotated together."""
    t, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d // 2, device=x.device, dtype=x.dtype) * 2 / d)  # (D/2,)
    ang = torch.arange(t, device=x.device, dtype=x.dtype)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, T, D)


class LocalAttention(nn.Module):
    """Multi-head causal self-attention within the segment: x (B, T, C) -> (B, T, C).

    Also the local half of :class:`MemoryAugmentedAttention`, which uses its projections.
    """

    def __init__(self, d_model: int, n_heads: int, rotary: bool = False, rotary_base: float = 10000.0) -> None:
        super().__init__()
        _need(n_heads >= 1 and d_model % n_heads == 0, f"d_model = {d_model} must be a multiple of n_heads = {n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.rotary, self.rotary_base = rotary, rotary_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, H, T, D) of x (B, T, C), before any position encoding."""
        _need(
            x.dim() == 3 and x.shape[-1] == self.d_model,
            f"attention input must be (B, T, {self.d_model}), got {tuple(x.shape)}",
        )
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal softmax attention of each position over positions <= itself: (B, H, T, D)."""
        if self.rotary:
            q, k = _rotate(q, self.rotary_base), _rotate(k, self.rotary_base)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)

    def merge(self, o: Tensor) -> Tensor:
        """Heads (B, H, T, D) -> output projection (B, T, C)."""
        b, h, t, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, t, h * d))  # (B, T, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.attend(*self.heads(x)))


class MemoryAugmentedAttention(nn.Module):
    """Local causal attention fused with top-k retrieval from an external memory, per head.

    ``forward(x (B, T, C), memory) -> (y (B, T, C), memory')``: y reads the local segment and the
    pairs of ``memory`` (earlier segments only); ``memory'`` is ``memory`` with this segment's T
    (key, value) pairs per head appended (detached) and the oldest evicted beyond ``capacity``.
    With an empty memory y is exactly the local attention (the gate plays no part).
    Parameters: the projections of :class:`LocalAttention` (``attn``) and the gate biases
    ``gate`` (H,), ``g_h = sigmoid(gate[h])``.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.attn = LocalAttention(config.d_model, config.n_heads, config.rotary, config.rotary_base)
        self.gate = nn.Parameter(torch.full((config.n_heads,), float(config.gate_init)))
        self.retriever: Retriever = RETRIEVERS[config.retriever](config)

    def empty_memory(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> FusionMemory:
        """A memory with no pairs (N = 0) for ``batch_size`` sequences."""
        _need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        ref = self.gate
        shape = (batch_size, self.config.n_heads, 0, self.config.d_head)
        z = torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype)  # (B, H, 0, D)
        return FusionMemory(keys=z, values=z.clone())

    def _check_memory(self, memory: FusionMemory, x: Tensor) -> None:
        c = self.config
        want = (x.shape[0], c.n_heads, c.d_head)
        for name, t in (("keys", memory.keys), ("values", memory.values)):
            _need(
                t.dim() == 4 and (t.shape[0], t.shape[1], t.shape[3]) == want,
                f"memory {name} must be (B, H, N, D) with (B, H, D) = {want}, got {tuple(t.shape)}",
            )
            _need(t.dtype == x.dtype, f"memory {name} dtype {t.dtype} differs from the input's {x.dtype}")
            _need(t.device == x.device, f"memory {name} is on {t.device}, the input on {x.device}")
        _need(
            memory.keys.shape == memory.values.shape,
            f"memory keys {tuple(memory.keys.shape)} and values {tuple(memory.values.shape)} differ in shape",
        )
        _need(memory.size <= c.capacity, f"memory holds {memory.size} pairs, more than capacity = {c.capacity}")

    def gates(self) -> Tensor:
        """g_h = sigmoid(b_h), (H,)."""
        return torch.sigmoid(self.gate)

    def forward(self, x: Tensor, memory: FusionMemory | None = None) -> tuple[Tensor, FusionMemory]:
        c = self.config
        q, k, v = self.attn.heads(x)  # 3 x (B, H, T, D)
        if memory is None:
            memory = self.empty_memory(x.shape[0], x.device, x.dtype)
        self._check_memory(memory, x)
        o = self.attn.attend(q, k, v)  # (B, H, T, D)
        n = memory.size
        if n > 0:
            b, h, t, d = q.shape
            top = n if c.top_k is None else min(c.top_k, n)
            mem = self.retriever(
                q.reshape(b * h, t, d), memory.keys.reshape(b * h, n, d), memory.values.reshape(b * h, n, d), top
            ).view(b, h, t, d)  # (B, H, T, D)
            g = self.gates().view(1, h, 1, 1)  # (1, H, 1, 1)
            o = g * mem + (1 - g) * o  # (B, H, T, D)
        keys = torch.cat([memory.keys, k.detach()], dim=2)[:, :, -c.capacity :]  # (B, H, min(N + T, cap), D)
        values = torch.cat([memory.values, v.detach()], dim=2)[:, :, -c.capacity :]  # (B, H, min(N + T, cap), D)
        return self.attn.merge(o), FusionMemory(keys=keys, values=values)


__all__ = [
    "RETRIEVERS",
    "DndRetriever",
    "FusionConfig",
    "FusionMemory",
    "HopfieldRetriever",
    "KnnRetriever",
    "LocalAttention",
    "MemoryAugmentedAttention",
    "Retriever",
]
