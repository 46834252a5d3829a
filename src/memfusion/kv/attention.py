"""Attention kernels shared by every KV policy.

All kernels work at KV-head granularity: the ``G = H_q / H_kv`` query heads that share one KV
head are folded into the query-row axis, so K/V are read once per KV head and never expanded
to query heads (no ``repeat_kv``). Query head ``h`` belongs to KV head ``h // G`` (the
convention of ``transformers``' ``repeat_kv``).

Shapes (``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads, ``G = Hq // Hkv``, ``Tq`` new
tokens, ``N`` resident keys, ``D`` head dim):

- ``q``: ``(B, Hq, Tq, D)`` as the model computes it;
- ``k``, ``v``: ``(B, Hkv, N, D)``;
- ``key_mask``: ``(B, 1 | Hkv, N)`` bool, True where the key may be attended;
- ``key_bias``: ``(B, 1 | Hkv, N)`` float added to the logits (e.g. ``log(count)`` of a pooled key);
- ``causal_tail``: 0, or ``Tq`` when the last ``Tq`` keys are the queries' own keys in order:
  query ``i`` then sees tail key ``j`` only if ``j <= i`` and always sees its own key, so no
  row is ever fully masked (a padding query attends to itself rather than producing NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_mask(
    key_mask: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    tq: int,
    n: int,
    causal_tail: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """An additive float mask ``(B|1, 1|Hkv, Tq|1, N)`` (0 / bias where allowed, -inf elsewhere)."""
    if key_mask is None and key_bias is None and (causal_tail == 0 or tq == 1):
        return None
    if key_mask is None:
        allowed = torch.ones(1, 1, 1, n, dtype=torch.bool, device=device)  # (1, 1, 1, N)
    else:
        allowed = key_mask.unsqueeze(2)  # (B, h, 1, N)
    if causal_tail:
        own = torch.zeros(1, 1, tq, n, dtype=torch.bool, device=device)  # (1, 1, Tq, N)
        own[..., n - causal_tail :] = torch.eye(tq, dtype=torch.bool, device=device)
        if tq > 1:
            tail = torch.ones(tq, n, dtype=torch.bool, device=device)
            tail[:, n - causal_tail :] = torch.ones(tq, tq, dtype=torch.bool, device=device).tril()
            allowed = allowed & tail  # (B, h, Tq, N)
        allowed = allowed | own
    zero = torch.zeros((), dtype=dtype, device=device)
    bias = zero if key_bias is None else key_bias.unsqueeze(2).to(dtype)  # (B, h, 1, N)
    return torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=dtype, device=device))


def attention_logits(qg: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits ``(B, Hkv, R, N)`` of query rows ``qg (B, Hkv, R, D)`` against ``k (B, Hkv, N, D)``.

    Computed as ``k @ qg^T`` (a tall-skinny GEMM that streams K row by row) and transposed into a
    contiguous ``(R, N)`` block: for decode-sized ``R`` this layout read K markedly faster than
    ``qg @ k^T`` or CPU SDPA when it was chosen; ``memfusion bench --suite kv`` reports the K/V
    read rate it reaches against the machine's STREAM copy bandwidth.
    """
    logits = torch.matmul(k, (qg * scaling).transpose(-1, -2))  # (B, Hkv, N, R)
    logits = logits.transpose(-1, -2).contiguous()  # (B, Hkv, R, N)
    return logits if mask is None else logits.add_(mask)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    causal_tail: int = 0,
    cached: bool = False,
) -> torch.Tensor:
    """Softmax attention of ``q`` over ``k``/``v``; returns ``(B, Tq, Hq, D)`` (the HF layout).

    ``cached``: K/V were just written (quest's gathered pages) and sit in the CPU caches; a decode
    step then runs on SDPA's kernel with the group's query heads as rows, which computed 3.5x faster
    than the ``k @ q^T`` layout on 4K cached keys, while on keys streamed from memory (32K) the
    latter read K/V 1.4x faster (``memfusion bench --suite kv`` reports both policies)."""
    b, hq, tq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    if cached and tq == 1 and key_bias is None:  # no causal tail to apply: one query sees every allowed key
        qg = q.reshape(b, hkv, g, d)  # (B, Hkv, G, D)
        allowed = None if key_mask is None else key_mask.unsqueeze(2)  # (B, 1|Hkv, 1, N)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=allowed, scale=scaling)  # (B, Hkv, G, D)
        return out.reshape(b, 1, hq, d)
    mask = logit_mask(key_mask, key_bias, tq, n, causal_tail, q.device, q.dtype)
    if tq == 1:
        qg = q.reshape(b, hkv, g, d)  # (B, Hkv, G, D): a KV head's query heads as rows
        probs = torch.softmax(attention_logits(qg, k, scaling, mask), dim=-1)  # (B, Hkv, G, N)
        return torch.matmul(probs, v).reshape(b, 1, hq, d)  # (B, Hkv, G, D) -> (B, 1, Hq, D)
    qg = q.view(b, hkv, g, tq, d)  # (B, Hkv, G, Tq, D)
    outs = [
        F.scaled_dot_product_attention(qg[:, :, i], k, v, attn_mask=mask, scale=scaling)  # (B, Hkv, Tq, D)
        for i in range(g)
    ]
    out = torch.stack(outs, dim=2)  # (B, Hkv, G, Tq, D)
    return out.reshape(b, hq, tq, d).transpose(1, 2)  # (B, Tq, Hq, D)


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    causal_tail: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`grouped_attention`, and also the attention probabilities.

    Returns ``out (B, Tq, Hq, D)`` and ``probs (B, Hkv, G, Tq, N)`` (rows sum to 1), for
    policies that score tokens by the attention they receive (H2O, SnapKV, CCA).
    """
    b, hq, tq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.view(b, hkv, g, tq, d)  # (B, Hkv, G, Tq, D)
    logits = torch.einsum("bhgtd,bhnd->bhgtn", qg, k) * scaling  # (B, Hkv, G, Tq, N)
    mask = logit_mask(key_mask, key_bias, tq, n, causal_tail, q.device, logits.dtype)
    if mask is not None:
        logits = logits + mask.unsqueeze(2)  # mask (B, h, Tq, N) -> (B, h, 1, Tq, N)
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgtn,bhnd->bhgtd", probs, v)  # (B, Hkv, G, Tq, D)
    return out.reshape(b, hq, tq, d).transpose(1, 2), probs


def partial_attention(
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    logit_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over one part of the keys, for merging parts with :func:`merge_partials`.

    ``qg``: ``(B, Hkv, R, D)`` query rows per KV head (``R = G * Tq``); ``k``, ``v``:
    ``(B, Hkv, N, D)`` (any strides: a view into a page pool is read in place);
    ``logit_mask``: additive, broadcastable to ``(B, Hkv, R, N)``.
    Returns ``out (B, Hkv, R, D)`` normalised within the part and ``lse (B, Hkv, R)``, the
    log-sum-exp of the part's logits (``-inf`` and a zero output where every key is masked).
    """
    logits = attention_logits(qg, k, scaling, logit_mask)  # (B, Hkv, R, N)
    lse = torch.logsumexp(logits, dim=-1)  # (B, Hkv, R)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - safe.unsqueeze(-1))  # (B, Hkv, R, N); all-masked rows are all 0
    return torch.matmul(probs, v), lse


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine ``(out, lse)`` parts over disjoint key sets into exact softmax attention.

    ``out_i (..., R, D)``, ``lse_i (..., R)`` -> ``(..., R, D)``; ``sum_i exp(lse_i - m) out_i /
    sum_i exp(lse_i - m)`` with ``m`` the running max (flash-decoding's merge).
    """
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # (P, ..., R)
    m = lse.max(dim=0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # (P, ..., R); exp(-inf) = 0 for empty parts
    total = w.sum(dim=0).clamp_min(torch.finfo(w.dtype).tiny)
    out = sum(w_i.unsqueeze(-1) * p[0] for w_i, p in zip(w, parts, strict=True))
    assert isinstance(out, torch.Tensor)
    return out / total.unsqueeze(-1)

