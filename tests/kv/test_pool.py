"""The page pool without a model: exact page ids, and invariants over random operation sequences.

The state machine keeps an independent reference (each sequence's tokens) and a fake storage
that applies the copies and writes the pool reports; reading a sequence back through its block
table must give its own tokens, each with its own prefix (a prefix hit may only substitute a
page written after the same prefix).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from memfusion.errors import InvalidInput
from memfusion.kv.pool import AppendPlan, PagePool


def test_allocation_is_contiguous_per_sequence() -> None:
    pool = PagePool(page_size=4, capacity=8)
    a, b = pool.new_sequence(), pool.new_sequence()
    pool.append(a, 6)  # pages 0, 1
    pool.append(b, 5)  # pages 2, 3
    pool.append(a, 4)  # page 1 fills, then page 4 (2 is taken)
    assert pool.block_table(a) == [0, 1, 4]
    assert pool.block_table(b) == [2, 3]
    assert pool.runs(a) == [(0, 2), (4, 1)]
    c = pool.new_sequence()
    pool.append(c, 4)  # page 5
    pool.free(b)  # pages 2, 3 free: lower than c's next page 6, yet c takes 6
    pool.append(c, 1)
    assert pool.block_table(c) == [5, 6] and pool.runs(c) == [(5, 2)]
    pool.check()


def test_freed_pages_are_reused_before_growing() -> None:
    pool = PagePool(page_size=2, capacity=4)
    a = pool.new_sequence()
    pool.append(a, 8)
    assert pool.block_table(a) == [0, 1, 2, 3] and pool.capacity == 4
    pool.free(a)
    assert pool.pages_used == 0
    b = pool.new_sequence()
    pool.append(b, 8)
    assert pool.block_table(b) == [0, 1, 2, 3] and pool.capacity == 4
    pool.append(b, 1)  # full: the pool doubles
    assert pool.block_table(b) == [0, 1, 2, 3, 4] and pool.capacity == 8
    pool.check()


def test_prefix_hits_share_full_pages_only() -> None:
    pool = PagePool(page_size=3)
    a, b = pool.new_sequence(), pool.new_sequence()
    pool.append(a, 8, [1, 2, 3, 4, 5, 6, 7, 8])  # pages 0, 1 full, 2 partial
    plan = pool.append(b, 7, [1, 2, 3, 4, 5, 6, 9])
    assert pool.block_table(b) == [0, 1, 3]
    assert plan.writes == [(3, 0, 6, 1)]  # only the token after the shared pages is written
    assert (pool.hits, pool.lookups) == (2, 4)
    assert pool.refcount[0] == pool.refcount[1] == 2
    c = pool.new_sequence()
    pool.append(c, 6, [1, 2, 3, 9, 9, 9])  # same first page, different second page
    assert pool.block_table(c)[0] == 0 and pool.block_table(c)[1] not in (0, 1)
    assert (pool.hits, pool.lookups) == (3, 6)
    pool.check()


def test_a_page_filling_up_to_a_stored_page_is_released() -> None:
    pool = PagePool(page_size=4)
    a, b = pool.new_sequence(), pool.new_sequence()
    pool.append(a, 4, [5, 5, 5, 5])
    pool.append(b, 2, [5, 5])
    assert pool.block_table(b) == [1]
    plan = pool.append(b, 3, [5, 5, 6])  # page 1 would equal page 0: b points to 0, frees 1
    assert pool.block_table(b) == [0, 1] and plan.writes == [(1, 0, 2, 1)]
    assert pool.hits == 1
    pool.check()


def test_copy_on_write_after_fork() -> None:
    pool = PagePool(page_size=4)
    a = pool.new_sequence()
    pool.append(a, 6, [1, 2, 3, 4, 5, 6])
    b = pool.fork(a)
    assert pool.block_table(b) == [0, 1] and pool.refcount[1] == 2
    plan = pool.append(b, 1, [7])
    assert plan.copies == [(1, 2, 2)] and plan.writes == [(2, 2, 0, 1)]
    assert pool.block_table(a) == [0, 1] and pool.block_table(b) == [0, 2]
    assert pool.refcount[0] == 2 and pool.refcount[1] == pool.refcount[2] == 1
    plan = pool.append(a, 1, [8])  # now private: written in place
    assert plan.copies == [] and plan.writes == [(1, 2, 0, 1)]
    pool.check()


def test_a_hash_collision_is_a_miss() -> None:
    pool = PagePool(page_size=2)
    a, b = pool.new_sequence(), pool.new_sequence()
    pool.append(a, 2, [1, 1])
    pool.hash_to_page[hash((0, (2, 2)))] = 0  # pretend [2, 2] hashes like page 0
    pool.append(b, 2, [2, 2])
    assert pool.block_table(b) == [1] and pool.hits == 0


def test_bad_use_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        PagePool(page_size=0)
    pool = PagePool(page_size=2)
    with pytest.raises(InvalidInput):
        pool.append(7, 1)
    with pytest.raises(InvalidInput):
        pool.append(pool.new_sequence(), 2, [1])


_UNKNOWN = itertools.count(-1, -1)  # unique stand-ins for tokens whose ids the pool is not told


class PoolMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(page_size=3, capacity=2)
        self.tokens: dict[int, list[int]] = {}
        self.storage: dict[int, list[tuple[int, ...] | None]] = {}
        self.max_used = 0

    def _apply(self, plan: AppendPlan, prefixes: list[tuple[int, ...]]) -> None:
        ps = self.pool.page_size
        for src, dst, n in plan.copies:
            page = self.storage.setdefault(dst, [None] * ps)
            page[:n] = self.storage[src][:n]
        for page_id, slot, first, count in plan.writes:
            page = self.storage.setdefault(page_id, [None] * ps)
            page[slot : slot + count] = prefixes[first : first + count]

    def _new(self) -> int:
        sid = self.pool.new_sequence()
        self.tokens[sid] = []
        return sid

    @rule(target=seqs)
    def new(self) -> int:
        return self._new()

    @rule(seq=seqs, ids=st.lists(st.integers(0, 1), max_size=7), known=st.booleans())
    def append(self, seq: int, ids: list[int], known: bool) -> None:
        if seq not in self.tokens:
            return
        toks = ids if known else [next(_UNKNOWN) for _ in ids]
        old = self.tokens[seq]
        prefixes = [tuple(old + toks[: i + 1]) for i in range(len(toks))]
        plan = self.pool.append(seq, len(toks), toks if known else None)
        self._apply(plan, prefixes)
        self.tokens[seq] = old + toks

    @rule(target=seqs, seq=seqs)
    def fork(self, seq: int) -> int:
        if seq not in self.tokens:
            return self._new()
        sid = self.pool.fork(seq)
        self.tokens[sid] = list(self.tokens[seq])
        return sid

    @rule(seq=consumes(seqs))
    def free(self, seq: int) -> None:
        if seq in self.tokens:
            self.pool.free(seq)
            del self.tokens[seq]

    @invariant()
    def pool_invariants_hold(self) -> None:
        self.pool.check()
        assert sorted(self.pool.sequences()) == sorted(self.tokens)

    @invariant()
    def every_sequence_reads_back_its_own_tokens(self) -> None:
        ps = self.pool.page_size
        for sid, toks in self.tokens.items():
            assert self.pool.length(sid) == len(toks)
            table = self.pool.block_table(sid)
            read = [self.storage[table[i // ps]][i % ps] for i in range(len(toks))]
            assert read == [tuple(toks[: i + 1]) for i in range(len(toks))]

    @invariant()
    def freed_pages_are_reused(self) -> None:
        # The pool grows only when no page is free; one append releases at most one page
        # after allocating, so capacity stays within twice the peak use (+1).
        self.max_used = max(self.max_used, self.pool.pages_used)
        assert self.pool.capacity <= max(2, 2 * (self.max_used + 1))

    @invariant()
    def hashed_pages_map_back(self) -> None:
        for h, page in self.pool.hash_to_page.items():
            assert self.pool.page_hash[page] == h and self.pool.refcount[page] > 0


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestPool = PoolMachine.TestCase
