"""DND: the differentiable neural dictionary of Neural Episodic Control (Pritzel et al. 2017).

A key -> value memory read by a kernel-weighted average over the ``k`` nearest stored keys:
``o = sum_i w_i v_i`` with ``w_i = K(h, h_i) / sum_j K(h, h_j)`` and ``K(h, h_i) = 1 / (||h - h_i||^2 + delta)``
(:func:`memfusion.neural.functional.dnd_kernel`), differentiable with respect to the query, the
stored keys and the stored values. Writes append new keys; a key already present (within
``match_tol``) has its value moved towards the written one, ``Q_i <- Q_i + alpha (v - Q_i)``; at
capacity the least recently used slot (written or returned by a lookup) is overwritten.

One dictionary serves a whole batch of queries (NEC keeps one DND per action), so the state's
first dimension is the slot, not the batch. Neighbours are found exactly (a matrix product over
all keys), or with an HNSW index (faiss) when ``approximate`` is set; either proposes
``oversample * k`` candidates, their exact distances pick the ``k`` neighbours, and the kernel
weights are always computed on exact distances. The index lives in the module as a cache of the
last state it saw; it is updated incrementally by :meth:`DND.write` and rebuilt when a different
state (or keys changed in place, e.g. by an optimizer) is looked up.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput
from memfusion.neural.base import MemoryState
from memfusion.neural.functional import dnd_kernel


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclass
class DNDConfig:
    """key_size ``D``; value_size ``V``; capacity: the most slots (NEC: 5e5); num_neighbours ``k`` (NEC: 50);
    delta: the kernel's ``delta`` (> 0, NEC: 1e-3); alpha: the learning rate of an update in place (0, 1];
    match_tol: the Euclidean distance within which a written key is the stored key (0 = bitwise equal).

    oversample: ``oversample * num_neighbours`` candidates are re-ranked by exact distances (from a full
    scan, whose one-matrix-product distances can lose precision, or from the index).
    approximate: find the candidates with an HNSW index (``hnsw_neighbours`` links per node,
    ``ef_construction`` / ``ef_search`` beam widths) once the memory holds more keys than the
    candidates; below that every key is a candidate anyway.
    """

    key_size: int
    value_size: int = 1
    capacity: int = 100_000
    num_neighbours: int = 50
    delta: float = 1e-3
    alpha: float = 0.1
    match_tol: float = 0.0
    approximate: bool = False
    hnsw_neighbours: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    oversample: int = 2

    def __post_init__(self) -> None:
        for name in ("key_size", "value_size", "capacity", "num_neighbours", "hnsw_neighbours", "oversample"):
            v = getattr(self, name)
            _need(isinstance(v, int) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        _need(
            self.num_neighbours <= self.capacity,
            f"num_neighbours ({self.num_neighbours}) must be <= capacity ({self.capacity})",
        )
        _need(self.delta > 0, f"delta must be > 0 (it keeps the kernel finite at distance 0), got {self.delta}")
        _need(0 < self.alpha <= 1, f"alpha must be in (0, 1], got {self.alpha}")
        _need(self.match_tol >= 0, f"match_tol must be >= 0, got {self.match_tol}")
        _need(self.ef_construction >= 1 and self.ef_search >= 1, "ef_construction and ef_search must be >= 1")


@dataclasses.dataclass(frozen=True)
class DNDState(MemoryState):
    """One dictionary. Slots ``0..size-1`` are in use (always a prefix: new keys append, evictions
    overwrite in place); the rest are zeros.

    keys (C, D); values (C, V); last_used (C,) int64: the clock tick of the last write or lookup of
    each slot (the least recently used slot has the smallest, ties broken by the lower slot);
    size () int64; clock () int64: ticks once per lookup batch and once per written pair.
    """

    keys: Tensor
    values: Tensor
    last_used: Tensor
    size: Tensor
    clock: Tensor

    @property
    def ages(self) -> Tensor:
        """(size,) ticks since each used slot was last written or looked up."""
        n = int(self.size)
        return self.clock - self.last_used[:n]


class _HNSWCache:
    """An HNSW index over the keys of one state (the keys tensor object and its in-place version).

    Invariants: ``slot_of[f]`` is the slot of faiss id ``f`` or -1 once stale (its slot was
    overwritten); ``fid_of[s]`` is the live faiss id of slot ``s``; rebuilt when stale ids outnumber live ones.
    """

    def __init__(self, config: DNDConfig, keys: Tensor, n: int) -> None:
        import faiss  # an optional cost: only the approximate search needs it

        self.index = faiss.IndexHNSWFlat(config.key_size, config.hnsw_neighbours)
        self.index.hnsw.efConstruction = config.ef_construction
        self.index.hnsw.efSearch = config.ef_search
        self.fid_of = np.full(config.capacity, -1, dtype=np.int64)
        self.slot_of = np.empty(0, dtype=np.int64)
        self.stale = 0
        self.keys_ref = keys
        self.keys_version = keys._version
        self.add(keys, np.arange(n, dtype=np.int64))

    def matches(self, keys: Tensor) -> bool:
        return keys is self.keys_ref and keys._version == self.keys_version

    def add(self, keys: Tensor, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        old = self.fid_of[slots]
        live_old = old[old >= 0]
        self.slot_of[live_old] = -1
        self.stale += len(live_old)
        start = self.index.ntotal
        vecs = keys[torch.as_tensor(slots, device=keys.device)].detach().to("cpu", torch.float32).numpy()
        self.index.add(np.ascontiguousarray(vecs))
        self.fid_of[slots] = np.arange(start, start + len(slots), dtype=np.int64)
        self.slot_of = np.concatenate([self.slot_of, slots.astype(np.int64)])

    def search(self, query: Tensor, kk: int) -> np.ndarray:
        """query (B, D) -> candidate slots (B, kk), -1 where none."""
        q = np.ascontiguousarray(query.detach().to("cpu", torch.float32).numpy())
        _, fids = self.index.search(q, kk)
        slots = np.where(fids >= 0, self.slot_of[np.maximum(fids, 0)], -1)
        return slots


class DND(nn.Module):
    """The differentiable neural dictionary. It holds no parameters: the dictionary is a
    :class:`DNDState` passed in and returned out (``initial_state`` / ``write`` / ``lookup``)."""

    def __init__(self, config: DNDConfig) -> None:
        super().__init__()
        self.config = config
        self._cache: _HNSWCache | None = None

    # ---------------------------------------------------------------- state

    def initial_state(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> DNDState:
        """An empty dictionary with ``capacity`` preallocated slots."""
        c = self.config
        dtype = dtype or torch.get_default_dtype()
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return DNDState(
            keys=torch.zeros(c.capacity, c.key_size, dtype=dtype, device=device),
            values=torch.zeros(c.capacity, c.value_size, dtype=dtype, device=device),
            last_used=torch.zeros(c.capacity, dtype=torch.int64, device=device),
            size=zero,
            clock=zero.clone(),
        )

    def _check_state(self, state: DNDState) -> None:
        c = self.config
        _need(isinstance(state, DNDState), f"state must be a DNDState, got {type(state).__name__}")
        _need(
            tuple(state.keys.shape) == (c.capacity, c.key_size),
            f"state.keys must be (capacity, key_size) = {(c.capacity, c.key_size)}, got {tuple(state.keys.shape)}",
        )
        _need(
            tuple(state.values.shape) == (c.capacity, c.value_size),
            f"state.values must be (capacity, value_size) = {(c.capacity, c.value_size)}, "
            f"got {tuple(state.values.shape)}",
        )
        _need(tuple(state.last_used.shape) == (c.capacity,), f"state.last_used must be ({c.capacity},)")
        _need(state.size.dim() == 0 and state.clock.dim() == 0, "state.size and state.clock must be scalars")

    def _check_query(self, state: DNDState, query: Tensor) -> int:
        self._check_state(state)
        c = self.config
        _need(
            query.dim() == 2 and query.shape[1] == c.key_size,
            f"query must be (B, key_size) = (B, {c.key_size}), got {tuple(query.shape)}",
        )
        _need(query.dtype == state.keys.dtype, f"query dtype {query.dtype} differs from the keys' {state.keys.dtype}")
        _need(bool(torch.isfinite(query).all()), "query contains NaN or inf")
        n = int(state.size)
        _need(n > 0, "the dictionary is empty: write at least one key before a lookup")
        _need(
            c.num_neighbours <= n,
            f"num_neighbours k = {c.num_neighbours} is larger than the {n} keys stored: "
            "write more keys or lower num_neighbours",
        )
        return n

    # ---------------------------------------------------------------- read

    def _scan(self, keys: Tensor, query: Tensor, kk: int) -> Tensor:
        """Candidates by a full scan: the kk nearest of keys (n, D) for query (B, D) by
        ``||h||^2 - 2 h.h_i + ||h_i||^2`` (one matrix product; re-ranked exactly after) -> (B, kk)."""
        d2 = (query * query).sum(-1, keepdim=True) - 2.0 * query @ keys.T + (keys * keys).sum(-1)  # (B, n)
        return torch.topk(d2, kk, dim=-1, largest=False).indices  # (B, kk)

    def neighbours(self, state: DNDState, query: Tensor) -> tuple[Tensor, Tensor]:
        """The k nearest stored keys of each query and their normalised kernel weights.

        query (B, D) -> (slots (B, k) int64, weights (B, k), every row summing to 1). Does not
        refresh the slots' ages (see :meth:`lookup`).
        """
        n = self._check_query(state, query)
        slots = self._select(state, query, n)  # (B, k)
        return slots, self._weights(state, query, slots)

    def _select(self, state: DNDState, query: Tensor, n: int) -> Tensor:
        """The k nearest slots (B, k): ``oversample * k`` candidates from the HNSW index or a full scan,
        then the k nearest of them by exact distances ``sum_d (h_d - h_i,d)^2``."""
        c = self.config
        k = c.num_neighbours
        kk = min(n, c.oversample * k)
        with torch.no_grad():
            keys = state.keys[:n].detach()  # (n, D)
            q = query.detach()
            if c.approximate and n > kk:
                cand = torch.as_tensor(self._index_for(state, n).search(q, kk), device=q.device)  # (B, kk), -1 = none
            else:
                cand = self._scan(keys, q, kk)  # (B, kk)
            valid = cand >= 0
            cand = cand.clamp_min(0)
            d2 = (keys[cand] - q.unsqueeze(1)).pow(2).sum(-1)  # (B, kk) exact distances
            d2 = d2.masked_fill(~valid, float("inf"))
            best = torch.topk(d2, k, dim=-1, largest=False)
            slots = cand.gather(1, best.indices)  # (B, k)
            short = (~valid).any(-1) & ~torch.isfinite(best.values).all(-1)  # the index found fewer than k
            if bool(short.any()):
                cand = self._scan(keys, q[short], kk)  # (b, kk)
                d2 = (keys[cand] - q[short].unsqueeze(1)).pow(2).sum(-1)  # (b, kk)
                slots[short] = cand.gather(1, torch.topk(d2, k, dim=-1, largest=False).indices)
            return slots

    def _weights(self, state: DNDState, query: Tensor, slots: Tensor) -> Tensor:
        near = state.keys[slots]  # (B, k, D)
        kernel = dnd_kernel(query, near, self.config.delta)  # (B, k)
        tiny = torch.finfo(kernel.dtype).tiny
        return kernel / kernel.sum(-1, keepdim=True).clamp_min(tiny)  # (B, k)

    def lookup(self, state: DNDState, query: Tensor) -> tuple[Tensor, DNDState]:
        """query (B, D) -> (the kernel-weighted value o (B, V), the state with the neighbours refreshed).

        Differentiable with respect to the query and the state's keys and values (the choice of the
        neighbours is not). Raises InvalidInput on an empty dictionary or one with fewer than k keys.
        """
        n = self._check_query(state, query)
        slots = self._select(state, query, n)  # (B, k)
        w = self._weights(state, query, slots)  # (B, k)
        out = torch.einsum("bk,bkv->bv", w, state.values[slots])  # (B, V)
        tick = state.clock + 1
        last_used = state.last_used.index_fill(0, slots.reshape(-1), tick)  # a copy: the state is immutable
        return out, dataclasses.replace(state, last_used=last_used, clock=tick)

    # ---------------------------------------------------------------- write

    def write(self, state: DNDState, keys: Tensor, values: Tensor) -> DNDState:
        """Write the pairs keys (B, D), values (B, V) in order; returns the new state.

        Equal to writing them one at a time: a key within ``match_tol`` of a stored key (the nearest
        one, including keys written earlier in the batch) updates that slot's value in place
        (``Q_i += alpha (v - Q_i)``, the key is kept); any other key takes a new slot, or the least
        recently used one at capacity. Every written slot becomes the most recently used. Matching is
        always exact (O(B n D)); differentiable with respect to the written keys and values and the
        old values.
        """
        self._check_state(state)
        c = self.config
        _need(
            keys.dim() == 2 and keys.shape[1] == c.key_size,
            f"keys must be (B, key_size) = (B, {c.key_size}), got {tuple(keys.shape)}",
        )
        _need(
            values.dim() == 2 and tuple(values.shape) == (keys.shape[0], c.value_size),
            f"values must be (B, value_size) = {(keys.shape[0], c.value_size)}, got {tuple(values.shape)}",
        )
        _need(keys.dtype == state.keys.dtype, f"keys dtype {keys.dtype} differs from the state's {state.keys.dtype}")
        _need(bool(torch.isfinite(keys).all() and torch.isfinite(values).all()), "keys or values contain NaN or inf")
        b = keys.shape[0]
        if b == 0:
            return state
        n, clock = int(state.size), int(state.clock)
        plan = _plan_writes(self.config, keys.detach(), state, n, clock)

        dev = keys.device
        slots = torch.as_tensor(plan.slots, dtype=torch.int64, device=dev)  # (S,)
        base = torch.as_tensor(plan.base, dtype=values.dtype, device=dev)  # (S,)
        rows = base.unsqueeze(-1) * state.values[slots]  # (S, V)
        terms = torch.as_tensor(plan.coef, dtype=values.dtype, device=dev)  # (E,)
        writes = torch.as_tensor(plan.coef_write, dtype=torch.int64, device=dev)  # (E,)
        targets = torch.as_tensor(plan.coef_row, dtype=torch.int64, device=dev)  # (E,)
        rows = rows.index_add(0, targets, terms.unsqueeze(-1) * values[writes])  # (S, V)
        new_values = state.values.index_copy(0, slots, rows)
        new_keys = state.keys
        if plan.created:
            cs = torch.as_tensor([s for s, _ in plan.created], dtype=torch.int64, device=keys.device)
            cj = torch.as_tensor([j for _, j in plan.created], dtype=torch.int64, device=keys.device)
            new_keys = state.keys.index_copy(0, cs, keys[cj])
        times = torch.as_tensor(plan.times, dtype=torch.int64, device=keys.device)
        new_state = DNDState(
            keys=new_keys,
            values=new_values,
            last_used=state.last_used.index_copy(0, slots, times),
            size=torch.full_like(state.size, plan.size),
            clock=torch.full_like(state.clock, clock + b),
        )
        if self._cache is not None and plan.created and self._cache.matches(state.keys):
            self._cache.add(new_keys, np.asarray([s for s, _ in plan.created], dtype=np.int64))
            self._cache.keys_ref, self._cache.keys_version = new_keys, new_keys._version
            if self._cache.stale > self._cache.index.ntotal - self._cache.stale:
                self._cache = None  # mostly stale: rebuilt at the next lookup
        return new_state

    def _index_for(self, state: DNDState, n: int) -> _HNSWCache:
        if self._cache is None or not self._cache.matches(state.keys):
            self._cache = _HNSWCache(self.config, state.keys, n)
        return self._cache

    def forward(self, state: DNDState, query: Tensor) -> tuple[Tensor, DNDState]:
        """Same as :meth:`lookup`."""
        return self.lookup(state, query)

    def extra_repr(self) -> str:
        c = self.config
        return f"key_size={c.key_size}, value_size={c.value_size}, capacity={c.capacity}, k={c.num_neighbours}"


@dataclass
class _WritePlan:
    """What a batch write does. slots: the touched slots; the new value of ``slots[r]`` is
    ``base[r] * old_value + sum_e coef[e] * values[coef_write[e]]`` over the entries e with
    ``coef_row[e] == r``; times: its new last_used; created: (slot, write index) whose key is stored;
    size: the new size."""

    slots: list[int] = dataclasses.field(default_factory=list)
    base: list[float] = dataclasses.field(default_factory=list)
    coef: list[float] = dataclasses.field(default_factory=list)
    coef_write: list[int] = dataclasses.field(default_factory=list)
    coef_row: list[int] = dataclasses.field(default_factory=list)
    times: list[int] = dataclasses.field(default_factory=list)
    created: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    size: int = 0


def _close_pairs(a: Tensor, b: Tensor, tol: float) -> list[list[tuple[float, int]]]:
    """For each row of a (B, D): the (distance, index) of the rows of b (n, D) within ``tol``.

    Pairs are prefiltered by the one-matrix-product squared distance with a slack covering its
    rounding error, then kept on their exact distance; chunked over b.
    """
    out: list[list[tuple[float, int]]] = [[] for _ in range(a.shape[0])]
    eps = torch.finfo(a.dtype).eps
    a2 = (a * a).sum(-1, keepdim=True)  # (B, 1)
    for start in range(0, b.shape[0], 16384):
        bb = b[start : start + 16384]  # (c, D)
        b2 = (bb * bb).sum(-1)  # (c,)
        d2 = a2 - 2.0 * a @ bb.T + b2  # (B, c)
        slack = 8 * a.shape[1] * eps * (a2 + b2)  # (B, c)
        rows, cols = torch.nonzero(d2 <= tol * tol + slack, as_tuple=True)
        exact = (a[rows] - bb[cols]).pow(2).sum(-1).sqrt()  # (pairs,)
        keep = exact <= tol
        for r, col, dist in zip(rows[keep].tolist(), cols[keep].tolist(), exact[keep].tolist(), strict=True):
            out[r].append((dist, start + col))
    return out


def _plan_writes(config: DNDConfig, keys: Tensor, state: DNDState, n: int, clock: int) -> _WritePlan:
    """Simulate the B writes one at a time on slot numbers only (the tensors are touched once after)."""
    cap, alpha, b = config.capacity, config.alpha, keys.shape[0]
    stored = _close_pairs(keys, state.keys[:n].detach(), config.match_tol) if n else [[] for _ in range(b)]
    earlier = _close_pairs(keys, keys, config.match_tol)  # includes the pair (j, j) and later ones: filtered below

    # Eviction candidates: the least recently used stored slots, oldest first (a write evicts at most
    # B of them and touches at most B more, so 2B candidates suffice); ties go to the lower slot.
    lru: list[int] = []
    if n + b > cap:
        order = state.last_used[:n] * cap + torch.arange(n, device=state.last_used.device)  # unique keys
        lru = torch.topk(order, min(n, 2 * b), largest=False).indices.tolist()
    lru_pos = 0

    src: dict[int, int] = {}  # slot -> the write that stored its current key (slots rewritten in this batch)
    created_slot: dict[int, int] = {}  # write -> the slot it created
    events: dict[int, list[int]] = {}  # slot -> writes since its key was stored (first = creator if in src)
    touched: OrderedDict[int, int] = OrderedDict()  # slot -> touch time, oldest first
    size = n

    def evict() -> int:
        nonlocal lru_pos
        while lru_pos < len(lru) and lru[lru_pos] in touched:
            lru_pos += 1
        if lru_pos < len(lru):
            lru_pos += 1
            return lru[lru_pos - 1]
        return next(iter(touched))  # every stored slot was touched: the oldest touch goes

    for j in range(b):
        t = clock + 1 + j
        cands = [(d, s) for d, s in stored[j] if s not in src]
        cands += [
            (d, created_slot[i]) for d, i in earlier[j] if i < j and i in created_slot and src.get(created_slot[i]) == i
        ]
        if cands:
            slot = min(cands)[1]
            events.setdefault(slot, []).append(j)
        else:
            if size < cap:
                slot, size = size, size + 1
            else:
                slot = evict()
            src[slot] = j
            created_slot[j] = slot
            events[slot] = [j]
        touched.pop(slot, None)
        touched[slot] = t

    plan = _WritePlan(size=size)
    for r, (slot, writes) in enumerate(events.items()):
        coef: dict[int, float] = {}
        if slot in src:  # the slot's key (and first value) came from this batch
            first = writes[0]
            coef[first], base = 1.0, 0.0
            plan.created.append((slot, first))
            updates = writes[1:]
        else:
            base, updates = 1.0, writes
        for j in updates:  # Q <- (1 - alpha) Q + alpha v_j
            coef = {i: x * (1.0 - alpha) for i, x in coef.items()}
            base *= 1.0 - alpha
            coef[j] = coef.get(j, 0.0) + alpha
        plan.slots.append(slot)
        plan.base.append(base)
        plan.times.append(touched[slot])
        for j, x in coef.items():
            plan.coef.append(x)
            plan.coef_write.append(j)
            plan.coef_row.append(r)
    return plan
