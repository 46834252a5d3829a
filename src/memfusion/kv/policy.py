"""The base policy: what a policy stores per layer and how attention reads it.

A policy is a config dataclass (``PolicyConfig``) that builds one ``KVLayer`` per model layer.
The model calls ``Cache.update`` (which stores nothing: it returns the new K/V untouched) and
then memfusion's attention function, which calls ``KVLayer.attend(q, k, v, valid, scaling)``:
the layer stores the new tokens, attends over what it keeps, and evicts/compresses afterwards.

Most policies keep a set of tokens per KV head; they share :class:`TokenStore` and
:class:`EvictingLayer`, whose subclasses only say *how many* tokens to keep (``capacity``) and
*which* (``score``: higher is kept).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from memfusion.errors import InvalidInput
from memfusion.kv import decodeattn
from memfusion.kv.attention import attention_with_probs, grouped_attention
from memfusion.kv.spec import ModelSpec
from memfusion.kv.stats import LayerStats

INF = float("inf")

HOST_DTYPES = (torch.float32, torch.float16, torch.float64, torch.int64, torch.bool)
"""Dtypes numpy shares memory with (bfloat16 has no numpy twin)."""


def advance_positions(real_seen: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, real_seen')`` for new tokens ``valid (B, Tq)`` after ``real_seen (B,)`` real tokens:
    ``pos (B, Tq)`` is each real token's index among its sequence's real tokens (-1 for padding).
    (A float32 decode step on the CPU counts in :meth:`TokenStore.append_token` instead.)"""
    csum = valid.long().cumsum(dim=1)
    return torch.where(valid, real_seen.unsqueeze(1) + csum - 1, -1), real_seen + csum[:, -1]


@dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config; subclasses validate their fields in ``__post_init__``."""

    name: ClassVar[str] = ""
    #: True when peak KV memory is bounded by the config, whatever the prompt length.
    bounded: ClassVar[bool] = False

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        raise NotImplementedError

    def make_layers(self, spec: ModelSpec) -> list[KVLayer]:
        """One layer per model layer; override to share state between layers (block tables)."""
        return [self.make_layer(i, spec) for i in range(spec.num_layers)]

    def analytic_tokens(self, seen: int) -> int:
        """Tokens kept per sequence per KV head after ``seen`` real tokens (uniform policies)."""
        return seen

    def analytic_bytes(self, seen: int, spec: ModelSpec, batch: int = 1) -> int:
        """Exact ``bytes_resident`` after ``seen`` real tokens, all layers, no padding."""
        return batch * spec.num_layers * self.analytic_tokens(seen) * spec.token_bytes


def require(cond: bool, message: str) -> None:
    """Config validation: raise :class:`InvalidInput` with ``message`` unless ``cond``."""
    if not cond:
        raise InvalidInput(message)


def require_int(value: Any, name: str, minimum: int) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an integer >= {minimum}, got {value!r}",
    )


class KVLayer(CacheLayerMixin):
    """One layer of a memfusion cache, seen by transformers as a ``CacheLayerMixin``.

    ``seen`` counts token slots processed (padding included): it is what the model uses as the
    cache length for positions and masks, whatever the layer keeps.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, spec: ModelSpec) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.spec = spec
        self.seen = 0
        #: bytes held at the moment of the last attention (new chunk in, nothing evicted yet);
        #: layers that hold more during attention than after it set this in ``attend``.
        self.inflight_bytes: int | None = None

    # --- the transformers contract -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.is_initialized = True
        return key_states, value_states  # stored by `attend`, which sees the query too

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0
        self.clear()

    def _unsupported(self, what: str) -> None:
        raise InvalidInput(
            f"{what} is not supported by memfusion KV caches; use greedy or sampling decoding with "
            "num_beams=1 and num_return_sequences=1"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropping the cache (assisted/speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("expanding the batch (num_return_sequences / beams)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("selecting batch rows (contrastive search)")

    def offload(self) -> None:  # transformers' own offloading does not apply to policy layers
        return None

    def prefetch(self) -> None:
        return None

    # --- the memfusion contract ----------------------------------------------------------
    def observe_input_ids(self, input_ids: torch.Tensor) -> None:
        """The token ids ``(B, Tq)`` of the forward about to run (for content hashing)."""

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Store the new tokens and attend.

        ``q (B, Hq, Tq, D)``, ``k``/``v (B, Hkv, Tq, D)`` (RoPE applied), ``valid (B, Tq)`` bool
        (False for padding). Returns ``(B, Tq, Hq, D)``. ``seen`` is advanced by the caller.
        """

    @abstractmethod
    def stats(self) -> LayerStats:
        """Exact figures for this layer now."""

    @abstractmethod
    def clear(self) -> None:
        """Drop everything stored."""


class TokenStore:
    """Resident tokens of one layer, per KV head, in preallocated buffers.

    Fields are tensors ``(B, Hkv, capacity, *)``: ``k``, ``v`` ``(..., D)``, ``pos`` (int64:
    the token's index among its sequence's real tokens, -1 for padding), ``valid`` (bool) and
    any extra per-token field a policy registers (scores, pooled counts).

    Invariants: entries ``[:n]`` of every field are the resident tokens of each (sequence, KV
    head) - the same count ``n`` in every row, not necessarily in position order; entries past
    ``n`` are garbage. The last ``m`` entries after ``append`` of ``m`` tokens are those tokens in
    order (attention relies on it for the causal mask of a chunk). ``evict`` fills the holes left
    by dropped entries with the survivors from the tail, so it costs O(evicted), not O(n).
    Capacity grows by doubling (amortised O(1) per token), capped near ``limit`` when one is set.
    """

    def __init__(self, batch: int, spec: ModelSpec, limit: int | None = None) -> None:
        self.batch, self.spec, self.limit = batch, spec, limit
        self.n = 0
        #: False while every appended token was real: no entry of ``valid`` is False, so attention
        #: needs no mask (once True it stays True, eviction of the padding aside: a mask is then redundant)
        self.padded = False
        self.capacity = 0
        self.fields: dict[str, torch.Tensor] = {}
        #: numpy views of ``fields`` on the CPU (None elsewhere), for the decode step's compiled append
        #: and attention: no torch call to reach the buffers (5-15 us apiece between a step's matmuls)
        self.host: dict[str, np.ndarray] | None = None
        self._extra_specs: dict[str, tuple[torch.dtype, float]] = {}
        self._grow(16)

    def add_field(self, name: str, dtype: torch.dtype, fill: float = 0.0) -> None:
        """Register a per-token field ``(B, Hkv, capacity)`` initialised to ``fill`` on append."""
        self._extra_specs[name] = (dtype, fill)
        self.fields[name] = torch.full(self._shape(), fill, dtype=dtype, device=self.spec.device)
        self._share()

    def _share(self) -> None:
        on_host = self.spec.device.type == "cpu" and all(t.dtype in HOST_DTYPES for t in self.fields.values())
        self.host = {name: t.numpy() for name, t in self.fields.items()} if on_host else None

    def _shape(self, cap: int | None = None) -> tuple[int, int, int]:
        return (self.batch, self.spec.num_kv_heads, self.capacity if cap is None else cap)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        if self.limit is not None:
            new_cap = max(needed, min(new_cap, self.limit + (needed - self.n)))
        s, d = self.spec, self.spec.head_dim
        shape = self._shape(new_cap)
        fresh = {
            "k": torch.empty(*shape, d, dtype=s.dtype, device=s.device),
            "v": torch.empty(*shape, d, dtype=s.dtype, device=s.device),
            "pos": torch.empty(shape, dtype=torch.int64, device=s.device),
            "valid": torch.zeros(shape, dtype=torch.bool, device=s.device),
        }
        for name, (dtype, fill) in self._extra_specs.items():
            fresh[name] = torch.full(shape, fill, dtype=dtype, device=s.device)
        for name, old in self.fields.items():
            fresh[name][:, :, : self.n] = old[:, :, : self.n]
        self.fields, self.capacity = fresh, new_cap
        self._share()

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        """``k``/``v (B, Hkv, m, D)``, ``pos (B, m)``, ``valid (B, m)``."""
        m = k.shape[2]
        if self.n + m > self.capacity:
            self._grow(self.n + m)
        sl = slice(self.n, self.n + m)
        f = self.fields
        f["k"][:, :, sl] = k
        f["v"][:, :, sl] = v
        f["pos"][:, :, sl] = pos.unsqueeze(1)  # (B, 1, m) -> every KV head
        f["valid"][:, :, sl] = valid.unsqueeze(1)
        self.padded = self.padded or not bool(valid.all())
        for name, (_, fill) in self._extra_specs.items():
            f[name][:, :, sl] = fill
        self.n += m

    def append_token(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, seen: torch.Tensor) -> bool:
        """A decode step's append (``k``/``v (B, Hkv, 1, D)``, ``valid (B, 1)``) in one compiled call
        that also advances ``seen (B,)`` (real tokens per sequence) in place. False, and nothing
        done, where that call does not serve (not float32 on the CPU, autograd, no numba)."""
        if self.host is None or k.requires_grad or v.requires_grad or not decodeattn.serves(k, self.fields["k"]):
            return False
        if self.n + 1 > self.capacity:
            self._grow(self.n + 1)
        from memfusion.kv.jitkernels import store_token  # numba: imported on first use

        h = self.host
        real = store_token(
            h["k"], h["v"], h["pos"], h["valid"], k.numpy(), v.numpy(), valid.numpy(), seen.numpy(), self.n
        )
        self.padded = self.padded or not real
        for name, (_, fill) in self._extra_specs.items():
            h[name][:, :, self.n] = fill
        self.n += 1
        return True

    def __getitem__(self, name: str) -> torch.Tensor:
        """The resident part of a field: ``(B, Hkv, n, *)`` (a view)."""
        return self.fields[name][:, :, : self.n]

    def evict(self, drop: torch.Tensor) -> None:
        """Remove entries ``drop (B, Hkv, e)`` (distinct indices < n in each row)."""
        e = drop.shape[-1]
        if e == 0:
            return
        n2 = self.n - e
        big = self.n
        # Holes: dropped entries inside the kept range [0, n2), ascending, padded with `big`.
        holes = torch.where(drop < n2, drop, big).sort(dim=-1).values  # (B, Hkv, e)
        # Movers: surviving entries of the tail [n2, n), ascending, padded with `big`.
        # Dropped tail entries; drops inside the kept range write to a dump slot `e` (writing
        # False at slot 0 could race with a True for tail entry n2: scatter_ with repeated indices).
        in_tail = torch.zeros(*drop.shape[:2], e + 1, dtype=torch.bool, device=drop.device)
        in_tail.scatter_(2, torch.where(drop >= n2, drop - n2, e), torch.ones_like(drop, dtype=torch.bool))
        in_tail = in_tail[..., :e]  # (B, Hkv, e)
        tail_idx = torch.arange(n2, self.n, device=drop.device).expand_as(in_tail)
        movers = torch.where(in_tail, big, tail_idx).sort(dim=-1).values  # (B, Hkv, e)
        # Each row has as many holes as movers; padding pairs write garbage past n2.
        dst = torch.where(holes == big, self.n - 1, holes)
        src = torch.where(movers == big, self.n - 1, movers)
        for t in self.fields.values():
            view = t[:, :, : self.n]
            extra = view.shape[3:]
            idx_src = src.view(*src.shape, *([1] * len(extra))).expand(*src.shape, *extra)
            idx_dst = dst.view(*dst.shape, *([1] * len(extra))).expand(*dst.shape, *extra)
            view.scatter_(2, idx_dst, view.gather(2, idx_src))
        self.n = n2

    def payload_bytes(self) -> int:
        return 2 * self.batch * self.spec.num_kv_heads * self.n * self.spec.head_dim * self.spec.elem_bytes

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.fields.items() if name in ("k", "v"))


class EvictingLayer(KVLayer):
    """A layer that keeps at most ``capacity()`` tokens per KV head (None: keep everything).

    Subclasses override ``capacity`` and ``score`` (``(B, Hkv, n)``, higher is kept; padding
    should score ``-inf``), and set ``uses_probs`` to receive attention probabilities in
    ``observe`` (for attention-based scores).
    """

    uses_probs: ClassVar[bool] = False

    def __init__(self, layer_idx: int, spec: ModelSpec) -> None:
        super().__init__(layer_idx, spec)
        self.store: TokenStore | None = None
        self.real_seen: torch.Tensor | None = None  # (B,) real tokens per sequence so far

    def capacity(self) -> int | None:
        return None

    def score(self) -> torch.Tensor:
        raise NotImplementedError

    def setup(self, store: TokenStore) -> None:
        """Register extra per-token fields on a new store."""

    def observe(self, probs: torch.Tensor | None, tq: int) -> None:
        """After attention: ``probs (B, Hkv, G, Tq, n)`` when ``uses_probs``."""

    def key_bias(self) -> torch.Tensor | None:
        """Logit bias ``(B, Hkv, n)`` added per resident key (e.g. ``log(count)`` of pooled keys)."""
        return None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        b, tq = valid.shape
        if self.store is None:
            self.store = TokenStore(b, self.spec, limit=self.capacity())
            self.setup(self.store)
            self.real_seen = torch.zeros(b, dtype=torch.int64, device=valid.device)
        assert self.real_seen is not None
        st = self.store
        if tq > 1 or not st.append_token(k, v, valid, self.real_seen):  # (a decode step: one compiled call)
            pos, self.real_seen = advance_positions(self.real_seen, valid)  # (B, Tq), (B,)
            st.append(k, v, pos, valid)
        self.inflight_bytes = st.payload_bytes()
        kb = self.key_bias()
        # No padding ever stored: skip the O(n) check and the logit mask.
        mask = None if not st.padded or bool(st["valid"].all()) else st["valid"]
        if self.uses_probs:
            out, probs = attention_with_probs(q, st["k"], st["v"], scaling, mask, kb, causal_tail=tq)
        elif tq == 1 and kb is None and decodeattn.serves(q, st.fields["k"]):
            # decode: every resident K/V read once, in place, split over the cores
            full_mask = None if mask is None else st.fields["valid"]
            if st.host is not None:
                out = decodeattn.decode_rows(q, st.host["k"], st.host["v"], 0, st.n, scaling, full_mask)
            else:
                out = decodeattn.decode_attention(q, st.fields["k"], st.fields["v"], 0, st.n, scaling, full_mask)
            probs = None
        else:
            out, probs = grouped_attention(q, st["k"], st["v"], scaling, mask, kb, causal_tail=tq), None
        self.observe(probs, tq)
        cap = self.capacity()
        if cap is not None and st.n > cap:
            drop = torch.topk(self.score(), st.n - cap, dim=-1, largest=False).indices  # (B, Hkv, e)
            st.evict(drop)
        return out

    def received(self, probs: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Attention each resident key received in this step, ``(B, Hkv, n)``.

        ``probs (B, Hkv, G, Tq, n)`` summed over the ``G`` query heads and over the step's last
        ``last`` queries (all when None), padding queries excluded. Call it from ``observe``
        (before eviction, the store's last ``Tq`` entries are the step's queries).
        """
        assert self.store is not None
        tq = probs.shape[3]
        w = tq if last is None else min(last, tq)
        real_q = self.store["valid"][:, :, self.store.n - w :]  # (B, Hkv, w): the last w queries
        return torch.einsum("bhgtn,bht->bhn", probs[:, :, :, tq - w :], real_q.to(probs.dtype))

    def newest_pos(self) -> torch.Tensor:
        """``(B, 1, 1)`` index of each sequence's latest real token."""
        assert self.real_seen is not None
        return (self.real_seen - 1).view(-1, 1, 1)

    def stats(self) -> LayerStats:
        st = self.store
        if st is None:
            return LayerStats(self.layer_idx)
        return LayerStats(
            self.layer_idx,
            tokens_resident=st.batch * st.n,
            bytes_resident=st.payload_bytes(),
            bytes_allocated=st.allocated_bytes(),
        )

    def clear(self) -> None:
        self.store = None
        self.real_seen = None
