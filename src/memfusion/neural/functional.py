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


# --------------------------------------------------------------------------------------------
# Shared checks. Every public function below validates its arguments and then calls an unchecked
# ``_name`` twin; the modules call the twins so that validation never costs training time.
# --------------------------------------------------------------------------------------------


def _check_memory(memory: Tensor) -> None:
    _need(memory.dim() == 3, f"memory must be (B, N, M), got shape {tuple(memory.shape)}")
    _need(memory.shape[1] > 0, "memory is empty (N = 0 slots): a memory needs at least one slot")
    _need(memory.shape[2] > 0, "memory slots have width M = 0: the slot width must be >= 1")


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...], doc: str) -> None:
    _need(tuple(t.shape) == shape, f"{name} must be {doc} = {shape}, got {tuple(t.shape)}")


def _check_weighting(name: str, w: Tensor) -> None:
    _need(w.dim() >= 1 and w.shape[-1] > 0, f"{name} is empty (N = 0 slots): a memory needs at least one slot")


# --------------------------------------------------------------------------------------------
# Content addressing and the erase/add write (NTM, DNC, MANN, DKVMN).
# --------------------------------------------------------------------------------------------


def _cosine_similarity(keys: Tensor, memory: Tensor) -> Tensor:
    """Unchecked :func:`cosine_similarity`."""
    dot = torch.einsum("bhm,bnm->bhn", keys, memory)  # (B, H, N)
    key_norm = keys.pow(2).sum(-1).add(EPS * EPS).sqrt()  # (B, H); eps keeps sqrt differentiable at 0
    mem_norm = memory.pow(2).sum(-1).add(EPS * EPS).sqrt()  # (B, N)
    return dot / (key_norm.unsqueeze(-1) * mem_norm.unsqueeze(1) + EPS)  # (B, H, N)


def cosine_similarity(keys: Tensor, memory: Tensor) -> Tensor:
    """``K(k_h, M[i]) = k_h . M[i] / (||k_h|| ||M[i]|| + eps)`` for every head h and slot i.

    The norms are ``||v|| = sqrt(sum v^2 + eps^2)`` (eps = :data:`EPS` = 1e-6), differentiable at 0.

    keys: (B, H, M); memory: (B, N, M). Returns (B, H, N) in [-1, 1]. A zero key or a zero row
    has similarity 0 with everything (the epsilons make it 0, not NaN, and keep the gradient finite).
    """
    _check_memory(memory)
    b, _, m = memory.shape
    _need(
        keys.dim() == 3 and keys.shape[0] == b and keys.shape[2] == m,
        f"keys must be (B, H, M) with B={b}, M={m} (the memory's batch and slot width), got {tuple(keys.shape)}",
    )
    return _cosine_similarity(keys, memory)


def _content_address(memory: Tensor, keys: Tensor, beta: Tensor) -> Tensor:
    """Unchecked :func:`content_address`."""
    return torch.softmax(beta.unsqueeze(-1) * _cosine_similarity(keys, memory), dim=-1)  # (B, H, N)


def content_address(memory: Tensor, keys: Tensor, beta: Tensor) -> Tensor:
    """Content-based addressing (Graves 2014 eq. 5): ``w_h[i] = softmax_i(beta_h * K(k_h, M[i]))``.

    memory: (B, N, M); keys: (B, H, M) one key per head; beta: (B, H) key strengths (>= 0).
    ``K`` is :func:`cosine_similarity`. Returns (B, H, N); every row sums to 1.
    """
    _check_memory(memory)
    b, _, m = memory.shape
    _need(
        keys.dim() == 3 and keys.shape[0] == b and keys.shape[2] == m,
        f"keys must be (B, H, M) with B={b}, M={m} (the memory's batch and slot width), got {tuple(keys.shape)}",
    )
    _check_shape("beta", beta, tuple(keys.shape[:2]), "(B, H)")
    _need(bool((beta >= 0).all()), "beta (key strength) must be >= 0; got a negative value")
    return _content_address(memory, keys, beta)


def _weighted_read(memory: Tensor, weights: Tensor) -> Tensor:
    """Unchecked :func:`weighted_read`."""
    return torch.einsum("bhn,bnm->bhm", weights, memory)  # (B, H, M)


def weighted_read(memory: Tensor, weights: Tensor) -> Tensor:
    """The read of every head (Graves 2014 eq. 2): ``r_h = sum_i w_h[i] M[i]``.

    memory: (B, N, M); weights: (B, H, N). Returns (B, H, M).
    """
    _check_memory(memory)
    b, n, _ = memory.shape
    _need(
        weights.dim() == 3 and weights.shape[0] == b and weights.shape[2] == n,
        f"weights must be (B, H, N) with B={b}, N={n}, got {tuple(weights.shape)}",
    )
    return _weighted_read(memory, weights)


def _erase_add_write(memory: Tensor, weights: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """Unchecked :func:`erase_add_write`."""
    keep = (1.0 - weights.unsqueeze(-1) * erase.unsqueeze(2)).prod(dim=1)  # (B, H, N, M) -> (B, N, M)
    return memory * keep + torch.einsum("bhn,bhm->bnm", weights, add)  # (B, N, M)


def erase_add_write(memory: Tensor, weights: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """The NTM write (Graves 2014 eq. 3-4), multi-head: ``M * prod_h (1 - w_h e_h^T) + sum_h w_h a_h^T``.

    memory: (B, N, M); weights: (B, H, N) write weightings; erase: (B, H, M) erase vectors in
    [0, 1]; add: (B, H, M) add vectors. Returns the new memory (B, N, M). All erasures are applied
    before all additions, so the result does not depend on the order of the heads.
    """
    _check_memory(memory)
    b, n, m = memory.shape
    _need(
        weights.dim() == 3 and weights.shape[0] == b and weights.shape[2] == n,
        f"weights must be (B, H, N) with B={b}, N={n}, got {tuple(weights.shape)}",
    )
    h = weights.shape[1]
    _check_shape("erase", erase, (b, h, m), "(B, H, M)")
    _check_shape("add", add, (b, h, m), "(B, H, M)")
    return _erase_add_write(memory, weights, erase, add)


# --------------------------------------------------------------------------------------------
# NTM location addressing (Graves 2014 section 3.3).
# --------------------------------------------------------------------------------------------


def _shift_index(n: int, s: int, device: torch.device) -> Tensor:
    """idx[i, k] = (i - (k - s // 2)) mod n: the slot whose weight offset ``k - s//2`` moves to slot i."""
    i = torch.arange(n, device=device).unsqueeze(1)  # (N, 1)
    k = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    return (i - (k - s // 2)) % n  # (N, S)


def _circular_shift(weights: Tensor, shift: Tensor) -> Tensor:
    """Unchecked :func:`circular_shift` for any leading dims: weights (*, N), shift (*, S)."""
    n, s = weights.shape[-1], shift.shape[-1]
    idx = _shift_index(n, s, weights.device)  # (N, S)
    gathered = weights[..., idx]  # (*, N, S): gathered[..., i, k] = w[(i - offset_k) mod N]
    return (gathered * shift.unsqueeze(-2)).sum(-1)  # (*, N)


def circular_shift(weights: Tensor, shift: Tensor) -> Tensor:
    """The NTM rotation (Graves 2014 eq. 8): ``w~[i] = sum_k s[k] w[(i - (k - S//2)) mod N]``.

    weights: (*, N), e.g. (B, N) or (B, H, N); shift: (*, S) a distribution over the S offsets
    ``-S//2 .. S - 1 - S//2`` (``shift[..., k]`` weighs offset ``k - S//2``). Offset +1 moves the
    focus from slot i to slot i + 1, wrapping from N - 1 to 0. Returns (*, N). Vectorised: one
    gather over a precomputed (N, S) circulant index, no loop over the batch or the slots.
    """
    _check_weighting("weights", weights)
    _need(shift.dim() >= 1 and shift.shape[-1] > 0, "shift must have at least one offset (S >= 1)")
    _need(
        shift.shape[:-1] == weights.shape[:-1],
        f"shift must be (*, S) with the leading dims of weights {tuple(weights.shape[:-1])}, got {tuple(shift.shape)}",
    )
    return _circular_shift(weights, shift)


def _sharpen(weights: Tensor, gamma: Tensor) -> Tensor:
    """Unchecked :func:`sharpen`; gamma has the weights' shape without the last dim."""
    return torch.softmax(gamma.unsqueeze(-1) * torch.log(weights + EPS), dim=-1)  # (*, N)


def sharpen(weights: Tensor, gamma: Tensor) -> Tensor:
    """NTM sharpening (Graves 2014 eq. 9): ``w[i] = w~[i]^gamma / sum_j w~[j]^gamma``, gamma >= 1.

    weights: (*, N) non-negative; gamma: (*, 1) or (*,). Computed as
    ``softmax(gamma * log(w~ + eps))``, which equals ``(w~ + eps)^gamma / sum`` but cannot
    underflow to 0/0 for large gamma (a plain ``w**gamma`` does, and its gamma-gradient is NaN at
    w = 0 because of ``log 0``). Returns (*, N) summing to 1.
    """
    _check_weighting("weights", weights)
    g = gamma.squeeze(-1) if gamma.dim() == weights.dim() else gamma
    _need(
        g.shape == weights.shape[:-1],
        f"gamma must be (*, 1) or (*,) with the leading dims of weights {tuple(weights.shape[:-1])}, "
        f"got {tuple(gamma.shape)}",
    )
    _need(bool((g >= 1).all()), "gamma (sharpening exponent) must be >= 1; got a value below 1")
    _need(bool((weights >= 0).all()), "weights must be non-negative to be sharpened")
    return _sharpen(weights, g)


def _ntm_address(
    memory: Tensor, key: Tensor, beta: Tensor, gate: Tensor, shift: Tensor, gamma: Tensor, prev: Tensor
) -> Tensor:
    """Unchecked multi-head NTM addressing.

    memory (B, N, M); key (B, H, M); beta, gate, gamma (B, H); shift (B, H, S); prev (B, H, N).
    Returns (B, H, N).
    """
    wc = _content_address(memory, key, beta)  # (B, H, N)
    g = gate.unsqueeze(-1)  # (B, H, 1)
    wg = g * wc + (1.0 - g) * prev  # (B, H, N)
    return _sharpen(_circular_shift(wg, shift), gamma)  # (B, H, N)


def ntm_address(
    memory: Tensor, key: Tensor, beta: Tensor, gate: Tensor, shift: Tensor, gamma: Tensor, prev: Tensor
) -> Tensor:
    """The full NTM addressing of one head (Graves 2014 eq. 5-9).

    1. content: ``wc = softmax(beta * cosine(key, M[i]))`` (:func:`content_address`);
    2. interpolation: ``wg = gate * wc + (1 - gate) * prev``;
    3. rotation: :func:`circular_shift` by ``shift`` (``shift[:, k]`` weighs offset ``k - S//2``;
       +1 moves the focus from slot i to i + 1);
    4. sharpening: :func:`sharpen` with ``gamma >= 1``.

    memory: (B, N, M); key: (B, M); beta: (B, 1) >= 0; gate: (B, 1) in [0, 1]; shift: (B, S) a
    distribution; gamma: (B, 1) >= 1; prev: (B, N) the head's previous weighting. Returns (B, N).
    """
    _check_memory(memory)
    b, n, m = memory.shape
    _check_shape("key", key, (b, m), "(B, M)")
    for name, t in (("beta", beta), ("gate", gate), ("gamma", gamma)):
        _check_shape(name, t, (b, 1), "(B, 1)")
    _check_shape("prev", prev, (b, n), "(B, N)")
    _need(
        shift.dim() == 2 and shift.shape[0] == b and shift.shape[1] > 0,
        f"shift must be (B, S), S >= 1, got {tuple(shift.shape)}",
    )
    _need(bool((beta >= 0).all()), "beta (key strength) must be >= 0; got a negative value")
    _need(bool((gamma >= 1).all()), "gamma (sharpening exponent) must be >= 1; got a value below 1")
    out = _ntm_address(memory, key.unsqueeze(1), beta, gate, shift.unsqueeze(1), gamma, prev.unsqueeze(1))  # (B, 1, N)
    return out.squeeze(1)  # (B, N)


# --------------------------------------------------------------------------------------------
# DNC dynamic memory allocation and temporal links (Graves et al. 2016, Methods).
# --------------------------------------------------------------------------------------------


def _dnc_retention(free_gates: Tensor, read_weights: Tensor) -> Tensor:
    """Unchecked :func:`dnc_retention`."""
    return (1.0 - free_gates.unsqueeze(-1) * read_weights).prod(dim=1)  # (B, R, N) -> (B, N)


def dnc_retention(free_gates: Tensor, read_weights: Tensor) -> Tensor:
    """The memory retention vector ``psi[i] = prod_r (1 - f_r w^r_{t-1,r}[i])``.

    free_gates: (B, R) in [0, 1]; read_weights: (B, R, N) the previous read weightings. Returns
    (B, N) in [0, 1]: how much of each slot is *not* freed by the read heads.
    """
    _need(read_weights.dim() == 3, f"read_weights must be (B, R, N), got shape {tuple(read_weights.shape)}")
    _check_weighting("read_weights", read_weights)
    _check_shape("free_gates", free_gates, tuple(read_weights.shape[:2]), "(B, R)")
    return _dnc_retention(free_gates, read_weights)


def _dnc_usage(prev_usage: Tensor, write_weights: Tensor, free_gates: Tensor, read_weights: Tensor) -> Tensor:
    """Unchecked :func:`dnc_usage`."""
    ww = write_weights.detach()  # stop_gradient, as deepmind/dnc Freeness.__call__
    written = 1.0 - (1.0 - ww).prod(dim=1)  # (B, W, N) -> (B, N): slot written by any head
    usage = prev_usage + (1.0 - prev_usage) * written  # == u + w - u * w
    return usage * _dnc_retention(free_gates, read_weights)  # (B, N)


def dnc_usage(prev_usage: Tensor, write_weights: Tensor, free_gates: Tensor, read_weights: Tensor) -> Tensor:
    """The usage update ``u_t = (u_{t-1} + w^w_{t-1} - u_{t-1} * w^w_{t-1}) * psi_t``.

    prev_usage: (B, N) in [0, 1]; write_weights: (B, W, N) the previous write weightings of the W
    write heads, combined as ``1 - prod_h (1 - w_h)``; free_gates: (B, R); read_weights: (B, R, N)
    the previous read weightings (see :func:`dnc_retention`). Returns (B, N) in [0, 1].

    Stop-gradient: as deepmind/dnc (``Freeness``), no gradient flows into ``write_weights`` here;
    usage is still differentiable with respect to ``prev_usage``, the free gates and read weights.
    """
    _need(prev_usage.dim() == 2, f"prev_usage must be (B, N), got shape {tuple(prev_usage.shape)}")
    _check_weighting("prev_usage", prev_usage)
    b, n = prev_usage.shape
    _need(
        write_weights.dim() == 3 and write_weights.shape[0] == b and write_weights.shape[2] == n,
        f"write_weights must be (B, W, N) with B={b}, N={n}, got {tuple(write_weights.shape)}",
    )
    _need(
        read_weights.dim() == 3 and read_weights.shape[0] == b and read_weights.shape[2] == n,
        f"read_weights must be (B, R, N) with B={b}, N={n}, got {tuple(read_weights.shape)}",
    )
    _check_shape("free_gates", free_gates, tuple(read_weights.shape[:2]), "(B, R)")
    return _dnc_usage(prev_usage, write_weights, free_gates, read_weights)


def _dnc_allocation(usage: Tensor) -> Tensor:
    """Unchecked :func:`dnc_allocation`: usage (*, N) -> (*, N)."""
    u = EPS + (1.0 - EPS) * usage  # keeps every factor of the cumprod >= eps
    sorted_u, phi = torch.sort(u, dim=-1, stable=True)  # (*, N) ascending usage; phi = free list
    ones = torch.ones_like(sorted_u[..., :1])  # (*, 1)
    prod_before = torch.cumprod(torch.cat([ones, sorted_u[..., :-1]], dim=-1), dim=-1)  # exclusive
    sorted_alloc = (1.0 - sorted_u) * prod_before  # (*, N), in sorted order
    return torch.zeros_like(u).scatter(-1, phi, sorted_alloc)  # (*, N) back in slot order


def dnc_allocation(usage: Tensor) -> Tensor:
    """The allocation weighting ``a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i]``.

    usage: (B, N) in [0, 1]. Usage is first clamped to ``eps + (1 - eps) u`` (eps = 1e-6, as
    deepmind/dnc) so the exclusive cumulative product never multiplies exact zeros; ``phi`` sorts
    the slots by ascending usage (ties: lower slot index first). Returns (B, N), summing to <= 1.

    Gradient: flows through the sorted usage values; the permutation ``phi`` is treated as a
    constant, i.e. the discontinuities of the sort are ignored as the paper (Methods, "Dynamic
    memory allocation") prescribes. The stop-gradient of deepmind/dnc is on the write weights
    entering the usage update (:func:`dnc_usage`), not here.
    """
    _need(usage.dim() == 2, f"usage must be (B, N), got shape {tuple(usage.shape)}")
    _check_weighting("usage", usage)
    return _dnc_allocation(usage)


def _dnc_write_weights(usage: Tensor, content: Tensor, write_gate: Tensor, allocation_gate: Tensor) -> Tensor:
    """Unchecked :func:`dnc_write_weights`."""
    heads = []
    for h in range(content.shape[1]):  # the few write heads, never the batch or the slots
        alloc = _dnc_allocation(usage)  # (B, N)
        g_a = allocation_gate[:, h : h + 1]  # (B, 1)
        g_w = write_gate[:, h : h + 1]  # (B, 1)
        heads.append(g_w * (g_a * alloc + (1.0 - g_a) * content[:, h]))  # (B, N)
        usage = usage + (1.0 - usage) * g_w * g_a * alloc  # the next head sees this one's allocation
    return torch.stack(heads, dim=1)  # (B, W, N)


def dnc_write_weights(usage: Tensor, content: Tensor, write_gate: Tensor, allocation_gate: Tensor) -> Tensor:
    """The write weighting ``w^w = g^w (g^a a + (1 - g^a) c^w)`` of each write head.

    usage: (B, N) the usage ``u_t``; content: (B, W, N) the write heads' content weightings;
    write_gate, allocation_gate: (B, W) in [0, 1]. With several write heads (deepmind/dnc), head
    h allocates from the usage updated by the allocations of heads < h. Returns (B, W, N).
    """
    _need(usage.dim() == 2, f"usage must be (B, N), got shape {tuple(usage.shape)}")
    _check_weighting("usage", usage)
    b, n = usage.shape
    _need(
        content.dim() == 3 and content.shape[0] == b and content.shape[2] == n,
        f"content must be (B, W, N) with B={b}, N={n}, got {tuple(content.shape)}",
    )
    _check_shape("write_gate", write_gate, tuple(content.shape[:2]), "(B, W)")
    _check_shape("allocation_gate", allocation_gate, tuple(content.shape[:2]), "(B, W)")
    return _dnc_write_weights(usage, content, write_gate, allocation_gate)


def _dnc_precedence(prev_precedence: Tensor, write_weights: Tensor) -> Tensor:
    """Unchecked :func:`dnc_precedence`."""
    return (1.0 - write_weights.sum(-1, keepdim=True)) * prev_precedence + write_weights  # (B, W, N)


def dnc_precedence(prev_precedence: Tensor, write_weights: Tensor) -> Tensor:
    """The precedence weighting ``p_t = (1 - sum_i w^w_t[i]) p_{t-1} + w^w_t`` (one per write head).

    prev_precedence, write_weights: (B, W, N). Returns (B, W, N): ``p_t[i]`` is the degree to which
    slot i was the last one written.
    """
    _need(write_weights.dim() == 3, f"write_weights must be (B, W, N), got shape {tuple(write_weights.shape)}")
    _check_weighting("write_weights", write_weights)
    _check_shape("prev_precedence", prev_precedence, tuple(write_weights.shape), "(B, W, N)")
    return _dnc_precedence(prev_precedence, write_weights)


def _dnc_link(prev_link: Tensor, prev_precedence: Tensor, write_weights: Tensor) -> Tensor:
    """Unchecked :func:`dnc_link`."""
    w_i = write_weights.unsqueeze(-1)  # (B, W, N, 1)
    w_j = write_weights.unsqueeze(-2)  # (B, W, 1, N)
    link = (1.0 - w_i - w_j) * prev_link + w_i * prev_precedence.unsqueeze(-2)  # (B, W, N, N)
    n = link.shape[-1]
    off_diagonal = 1.0 - torch.eye(n, dtype=link.dtype, device=link.device)  # (N, N)
    return link * off_diagonal  # (B, W, N, N), L[i, i] = 0


def dnc_link(prev_link: Tensor, prev_precedence: Tensor, write_weights: Tensor) -> Tensor:
    """The temporal link matrix ``L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j]``.

    prev_link: (B, W, N, N); prev_precedence: (B, W, N) the precedence *before* this write;
    write_weights: (B, W, N). Returns (B, W, N, N) with a zero diagonal: ``L[i, j]`` is the degree
    to which slot i was written right after slot j.
    """
    _need(write_weights.dim() == 3, f"write_weights must be (B, W, N), got shape {tuple(write_weights.shape)}")
    _check_weighting("write_weights", write_weights)
    b, w, n = write_weights.shape
    _check_shape("prev_precedence", prev_precedence, (b, w, n), "(B, W, N)")
    _check_shape("prev_link", prev_link, (b, w, n, n), "(B, W, N, N)")
    return _dnc_link(prev_link, prev_precedence, write_weights)


def _dnc_forward_weights(link: Tensor, read_weights: Tensor) -> Tensor:
    """Unchecked :func:`dnc_forward_weights`."""
    return torch.einsum("bwij,brj->brwi", link, read_weights)  # (B, R, W, N) = L w


def _dnc_backward_weights(link: Tensor, read_weights: Tensor) -> Tensor:
    """Unchecked :func:`dnc_backward_weights`."""
    return torch.einsum("bwji,brj->brwi", link, read_weights)  # (B, R, W, N) = L^T w


def _check_link_read(link: Tensor, read_weights: Tensor) -> None:
    _need(link.dim() == 4 and link.shape[2] == link.shape[3], f"link must be (B, W, N, N), got {tuple(link.shape)}")
    _check_weighting("link", link)
    b, _, n, _ = link.shape
    _need(
        read_weights.dim() == 3 and read_weights.shape[0] == b and read_weights.shape[2] == n,
        f"read_weights must be (B, R, N) with B={b}, N={n}, got {tuple(read_weights.shape)}",
    )


def dnc_forward_weights(link: Tensor, read_weights: Tensor) -> Tensor:
    """Forward read mode ``f = L w^r_{t-1}``: the slots written right after the ones just read.

    link: (B, W, N, N); read_weights: (B, R, N). Returns (B, R, W, N), one per read and write head.
    """
    _check_link_read(link, read_weights)
    return _dnc_forward_weights(link, read_weights)


def dnc_backward_weights(link: Tensor, read_weights: Tensor) -> Tensor:
    """Backward read mode ``b = L^T w^r_{t-1}``: the slots written right before the ones just read.

    link: (B, W, N, N); read_weights: (B, R, N). Returns (B, R, W, N).
    """
    _check_link_read(link, read_weights)
    return _dnc_backward_weights(link, read_weights)


def _dnc_read_weights(content: Tensor, forward: Tensor, backward: Tensor, modes: Tensor) -> Tensor:
    """Unchecked :func:`dnc_read_weights`."""
    w = forward.shape[2]
    back = (modes[..., :w].unsqueeze(-1) * backward).sum(2)  # (B, R, W, 1) * (B, R, W, N) -> (B, R, N)
    fwd = (modes[..., w : 2 * w].unsqueeze(-1) * forward).sum(2)  # (B, R, N)
    return back + fwd + modes[..., 2 * w :] * content  # (B, R, N)


def dnc_read_weights(content: Tensor, forward: Tensor, backward: Tensor, modes: Tensor) -> Tensor:
    """The read weighting ``w^r = sum_h pi[h] b_h + sum_h pi[W + h] f_h + pi[2W] c^r``.

    content: (B, R, N) content weightings; forward, backward: (B, R, W, N) from
    :func:`dnc_forward_weights` / :func:`dnc_backward_weights`; modes: (B, R, 2W + 1) a
    distribution over the read modes, ordered as deepmind/dnc: W backward, W forward, content.
    Returns (B, R, N).
    """
    _need(forward.dim() == 4, f"forward must be (B, R, W, N), got shape {tuple(forward.shape)}")
    _check_weighting("forward", forward)
    b, r, w, n = forward.shape
    _check_shape("backward", backward, (b, r, w, n), "(B, R, W, N)")
    _check_shape("content", content, (b, r, n), "(B, R, N)")
    _check_shape("modes", modes, (b, r, 2 * w + 1), "(B, R, 2W + 1)")
    return _dnc_read_weights(content, forward, backward, modes)


def _sparse_topk(weights: Tensor, k: int) -> Tensor:
    """Unchecked :func:`sparse_topk`."""
    top, idx = torch.topk(weights, k, dim=-1)  # (*, k)
    top = top / (top.sum(-1, keepdim=True) + EPS)  # renormalise the kept mass to 1
    return torch.zeros_like(weights).scatter(-1, idx, top)  # (*, N)


def sparse_topk(weights: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of each weighting (last dim), renormalised to sum to 1.

    weights: (*, N) non-negative; 1 <= k <= N. The sparse-access reads of Rae et al. 2016 (SAM):
    only k slots are read, and only they receive a gradient. Returns (*, N).
    """
    _check_weighting("weights", weights)
    n = weights.shape[-1]
    _need(1 <= k <= n, f"k must be in [1, N] = [1, {n}] (the number of memory slots), got {k}")
    return _sparse_topk(weights, k)


# --------------------------------------------------------------------------------------------
# LRUA: least recently used access (Santoro et al. 2016, "Meta-learning with memory-augmented
# neural networks", section 3.1).
# --------------------------------------------------------------------------------------------


def _lrua_usage(prev_usage: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float) -> Tensor:
    """Unchecked :func:`lrua_usage`."""
    return gamma * prev_usage + read_weights.sum(1) + write_weights.sum(1)  # (B, N)


def lrua_usage(prev_usage: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float) -> Tensor:
    """The LRUA usage ``w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t`` (summed over the heads).

    prev_usage: (B, N); read_weights, write_weights: (B, H, N); gamma: decay in [0, 1].
    Returns (B, N).
    """
    _need(prev_usage.dim() == 2, f"prev_usage must be (B, N), got shape {tuple(prev_usage.shape)}")
    _check_weighting("prev_usage", prev_usage)
    b, n = prev_usage.shape
    for name, t in (("read_weights", read_weights), ("write_weights", write_weights)):
        _need(
            t.dim() == 3 and t.shape[0] == b and t.shape[2] == n,
            f"{name} must be (B, H, N) with B={b}, N={n}, got {tuple(t.shape)}",
        )
    _need(0.0 <= gamma <= 1.0, f"gamma (usage decay) must be in [0, 1], got {gamma}")
    return _lrua_usage(prev_usage, read_weights, write_weights, gamma)


def _lrua_least_used(usage: Tensor, n: int) -> Tensor:
    """Unchecked :func:`lrua_least_used`."""
    idx = torch.sort(usage.detach(), dim=-1, stable=True).indices[..., :n]  # (B, n) least used slots
    return torch.zeros_like(usage).scatter(-1, idx, 1.0)  # (B, N) n-hot


def lrua_least_used(usage: Tensor, n: int) -> Tensor:
    """The least-used weighting ``w^lu[i] = 1 if u[i] <= m(u, n) else 0``: 1 on the n least-used slots.

    usage: (B, N); 1 <= n <= N. ``m(u, n)`` is the n-th smallest usage; ties are broken by slot
    index (lower first) so exactly n slots are set. Piecewise constant: it carries no gradient.
    Returns (B, N) with exactly n ones per row.
    """
    _need(usage.dim() == 2, f"usage must be (B, N), got shape {tuple(usage.shape)}")
    _check_weighting("usage", usage)
    slots = usage.shape[1]
    _need(1 <= n <= slots, f"n must be in [1, N] = [1, {slots}] (the number of memory slots), got {n}")
    return _lrua_least_used(usage, n)


def _lrua_write_weights(alpha: Tensor, prev_read: Tensor, prev_least_used: Tensor) -> Tensor:
    """Unchecked :func:`lrua_write_weights`."""
    sigma = torch.sigmoid(alpha).unsqueeze(-1)  # (B, H, 1)
    return sigma * prev_read + (1.0 - sigma) * prev_least_used.unsqueeze(1)  # (B, H, N)


def lrua_write_weights(alpha: Tensor, prev_read: Tensor, prev_least_used: Tensor) -> Tensor:
    """The LRUA write weighting ``w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``.

    alpha: (B, H) the interpolation logits of the H heads; prev_read: (B, H, N) the previous read
    weightings; prev_least_used: (B, N) the least-used weighting computed from the previous usage.
    Returns (B, H, N).
    """
    _need(prev_read.dim() == 3, f"prev_read must be (B, H, N), got shape {tuple(prev_read.shape)}")
    _check_weighting("prev_read", prev_read)
    b, h, n = prev_read.shape
    _check_shape("alpha", alpha, (b, h), "(B, H)")
    _check_shape("prev_least_used", prev_least_used, (b, n), "(B, N)")
    return _lrua_write_weights(alpha, prev_read, prev_least_used)
