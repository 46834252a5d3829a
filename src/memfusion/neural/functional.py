"""The addressing math of the differentiable memories, as pure functions with shape docs.

Symbols follow the papers: ``B`` batch, ``N`` memory slots, ``M`` / ``D`` slot width, ``H`` heads.
Every norm, division and cumulative product is guarded by an epsilon so that no function returns
NaN or inf for finite inputs, including all-zero memories and saturated gates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memfusion.errors import InvalidInput

EPS = 1e-6


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


def hopfield_retrieve(
    patterns: Tensor, query: Tensor, beta: float | Tensor, steps: int = 1, tol: float | None = None
) -> Tensor:
    """Modern Hopfield retrieval (Ramsauer et al. 2020): ``xi <- X^T softmax(beta * X xi)``.

    patterns: (B, N, D) stored patterns ``X``; query: (B, D) state ``xi``; beta: inverse
    temperature (> 0), a float or a (B,) / (B, 1) tensor. Runs ``steps`` updates, stopping early
    once the largest change of an update is below ``tol`` (when given). Returns (B, D).
    """
    _need(patterns.dim() == 3, f"patterns must be (B, N, D), got shape {tuple(patterns.shape)}")
    _need(patterns.shape[1] > 0, "patterns is empty (N = 0): store at least one pattern before retrieving")
    _need(
        query.dim() == 2 and query.shape[0] == patterns.shape[0] and query.shape[1] == patterns.shape[2],
        f"query must be (B, D) = {(patterns.shape[0], patterns.shape[2])}, got {tuple(query.shape)}",
    )
    _need(steps >= 1, f"steps must be >= 1, got {steps}")
    b = torch.as_tensor(beta, dtype=query.dtype, device=query.device)
    _need(bool((b > 0).all()), f"beta must be > 0, got {beta}")
    b = b.reshape(-1, 1) if b.dim() > 0 else b  # (B, 1) or scalar
    xi = query
    for _ in range(steps):
        logits = b * torch.einsum("bnd,bd->bn", patterns, xi)  # (B, N)
        new = torch.einsum("bn,bnd->bd", torch.softmax(logits, dim=-1), patterns)  # (B, D)
        done = tol is not None and float((new - xi).abs().max()) < tol
        xi = new
        if done:
            break
    return xi


def dnd_kernel(query: Tensor, keys: Tensor, delta: float = 1e-3) -> Tensor:
    """The DND's inverse-distance kernel ``k(h, h_i) = 1 / (||h - h_i||^2 + delta)``.

    query: (B, D); keys: (B, N, D). Returns the unnormalised kernel values (B, N); the DND
    normalises them over the neighbours it retrieved (``w_i = k_i / sum_j k_j``).
    """
    _need(keys.dim() == 3, f"keys must be (B, N, D), got shape {tuple(keys.shape)}")
    _need(
        query.dim() == 2 and query.shape[0] == keys.shape[0] and query.shape[1] == keys.shape[2],
        f"query must be (B, D) = {(keys.shape[0], keys.shape[2])}, got {tuple(query.shape)}",
    )
    _need(delta > 0, f"delta must be > 0, got {delta}")
    sq = (keys - query.unsqueeze(1)).pow(2).sum(-1)  # (B, N)
    return 1.0 / (sq + delta)
