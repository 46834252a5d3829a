"""A page pool with per-sequence block tables, prefix hashing and copy-on-write.

Pure book-keeping (no tensors): :class:`PagePool` decides which page slot every token of every
sequence lives in; the storage that follows it (``memfusion.kv.paged``) applies the copies and
writes that :meth:`PagePool.append` reports, in the order reported.

A sequence's tokens ``0 .. length-1`` live in its block table: token ``i`` is slot
``i % page_size`` of page ``table[i // page_size]``. Only the last page of a table may be
partial; every earlier page is full.

Invariants (checked by :meth:`PagePool.check`):

- **free / used**: every page id in ``[0, capacity)`` is either free (in the free set, refcount
  0, no hash, fill 0) or used (refcount > 0), never both.
- **refcounts**: a page's refcount is the number of its occurrences in all block tables (a page
  occurs at most once per table).
- **fill**: a page holding tokens ``i*page_size ..`` of a sequence of length ``n`` has fill
  ``min(page_size, n - i*page_size)``, the same for every sequence that holds it.
- **writes only into private pages**: tokens are written only into a page with refcount 1;
  appending into a shared partial page first gives the sequence a private copy
  (copy-on-write, reported as ``(src, dst, tokens)``). Full pages are never written again.
- **hashes**: a page may carry a hash only when it is used and full, every token id in it was
  known, and it is a table's first page or its previous page in the table is hashed; the hash is
  ``hash((parent_hash, token_ids))`` (vLLM's chained block hash). ``hash -> page`` is a
  bijection between hashed pages and the lookup table. The page also stores its exact key
  ``(parent page, token ids)``, compared on every lookup, so a hash collision is a miss, never a
  wrong hit. Every table holding a hashed page holds its parent page just before it. A page
  loses its hash only when it is freed.
- **prefix hits**: when a page fills up and its hash finds a stored page, the sequence points to
  that page instead (refcount + 1) and its own tokens for it are not written (a partial page it
  held is released). ``lookups`` counts hash lookups, ``hits`` those that found a page.
- **allocation**: a new page is the page right after the sequence's previous page when that one
  is free (so tables form runs of consecutive ids, readable as one strided view), else the
  lowest free page; freed pages are reused before the pool grows; the pool doubles when full.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from memfusion.errors import InvalidInput


@dataclass
class AppendPlan:
    """What storage must do for one :meth:`PagePool.append`, in this order.

    ``copies``: ``(src_page, dst_page, tokens)``: copy slots ``[0, tokens)`` (copy-on-write).
    ``writes``: ``(page, slot, first, count)``: new tokens ``first .. first+count-1`` of the
    append go to slots ``slot .. slot+count-1`` of ``page``. Tokens found by a prefix hit are in
    no write.
    """

    copies: list[tuple[int, int, int]] = field(default_factory=list)
    writes: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class _Seq:
    table: list[int] = field(default_factory=list)
    runs: list[list[int]] = field(default_factory=list)  # [first page, n pages] per run
    length: int = 0
    open_ids: list[int] | None = field(default_factory=list)  # ids in the partial last page

    def push(self, page: int) -> None:
        self.table.append(page)
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == page:
            self.runs[-1][1] += 1
        else:
            self.runs.append([page, 1])

    def pop(self) -> int:
        self.runs[-1][1] -= 1
        if self.runs[-1][1] == 0:
            self.runs.pop()
        return self.table.pop()


class PagePool:
    """Pages of ``page_size`` token slots shared by sequences (see the module invariants)."""

    def __init__(self, page_size: int, capacity: int = 16) -> None:
        if not (isinstance(page_size, int) and page_size >= 1 and isinstance(capacity, int) and capacity >= 1):
            raise InvalidInput(f"page_size and capacity must be integers >= 1, got {page_size!r}, {capacity!r}")
        self.page_size = page_size
        self.capacity = 0
        self.refcount: list[int] = []
        self.fill: list[int] = []
        self.page_hash: list[int | None] = []
        self.page_key: list[tuple[int, tuple[int, ...]] | None] = []
        self.hash_to_page: dict[int, int] = {}
        self._free: set[int] = set()
        self._free_heap: list[int] = []
        self._seqs: dict[int, _Seq] = {}
        self._next_seq = 0
        self.hits = 0
        self.lookups = 0
        self._grow(capacity)

    # --- pages ---------------------------------------------------------------------------
    def _grow(self, new_capacity: int) -> None:
        old = self.capacity
        self.refcount += [0] * (new_capacity - old)
        self.fill += [0] * (new_capacity - old)
        self.page_hash += [None] * (new_capacity - old)
        self.page_key += [None] * (new_capacity - old)
        for p in range(old, new_capacity):
            self._free.add(p)
            heapq.heappush(self._free_heap, p)
        self.capacity = new_capacity

    def _alloc(self, prefer: int | None) -> int:
        if not self._free:
            self._grow(2 * self.capacity)
        if prefer is not None and prefer in self._free:
            page = prefer
        else:
            while self._free_heap[0] not in self._free:  # stale entries of pages taken by `prefer`
                heapq.heappop(self._free_heap)
            page = heapq.heappop(self._free_heap)
        self._free.remove(page)
        self.refcount[page] = 1
        if len(self._free_heap) > 2 * self.capacity:
            self._free_heap = sorted(self._free)
        return page

    def _release(self, page: int) -> None:
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            h = self.page_hash[page]
            if h is not None:
                del self.hash_to_page[h]
            self.page_hash[page] = None
            self.page_key[page] = None
            self.fill[page] = 0
            self._free.add(page)
            heapq.heappush(self._free_heap, page)

    @property
    def pages_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def tokens_stored(self) -> int:
        """Token slots written in used pages, each page once however many tables hold it."""
        return sum(self.fill)

    # --- sequences -----------------------------------------------------------------------
    def new_sequence(self) -> int:
        sid = self._next_seq
        self._next_seq += 1
        self._seqs[sid] = _Seq()
        return sid

    def fork(self, seq: int) -> int:
        """A new sequence sharing every page of ``seq`` (refcounts + 1)."""
        src = self._get(seq)
        sid = self.new_sequence()
        self._seqs[sid] = _Seq(
            table=list(src.table),
            runs=[list(r) for r in src.runs],
            length=src.length,
            open_ids=None if src.open_ids is None else list(src.open_ids),
        )
        for p in src.table:
            self.refcount[p] += 1
        return sid

    def free(self, seq: int) -> None:
        """Drop ``seq``; its pages are released (free when no other table holds them)."""
        for p in self._get(seq).table:
            self._release(p)
        del self._seqs[seq]

    def sequences(self) -> list[int]:
        return list(self._seqs)

    def block_table(self, seq: int) -> list[int]:
        return list(self._get(seq).table)

    def runs(self, seq: int) -> list[tuple[int, int]]:
        """The block table as runs ``(first page, n pages)`` of consecutive page ids."""
        return [(r[0], r[1]) for r in self._get(seq).runs]

    def length(self, seq: int) -> int:
        return self._get(seq).length

    def _get(self, seq: int) -> _Seq:
        if seq not in self._seqs:
            raise InvalidInput(f"unknown sequence {seq!r}; live sequences: {sorted(self._seqs)}")
        return self._seqs[seq]

    def append(self, seq: int, n: int, token_ids: Sequence[int] | None = None) -> AppendPlan:
        """Add ``n`` tokens to ``seq``; ``token_ids`` (length ``n``) enable prefix hashing."""
        s = self._get(seq)
        if token_ids is not None and len(token_ids) != n:
            raise InvalidInput(f"append: {len(token_ids)} token ids for {n} tokens")
        ps = self.page_size
        plan = AppendPlan()
        done = 0
        while done < n:
            off = s.length % ps
            take = min(ps - off, n - done)
            if off == 0:
                s.open_ids = []
            ids = None if s.open_ids is None or token_ids is None else s.open_ids + list(token_ids[done : done + take])
            full = off + take == ps
            key, h, hit = self._lookup(s, ids) if full else (None, None, None)
            if hit is not None:
                if off:
                    self._release(s.pop())
                self.refcount[hit] += 1
                s.push(hit)
            else:
                page = self._writable(s, off, plan)
                plan.writes.append((page, off, done, take))
                self.fill[page] += take
                if h is not None and key is not None and h not in self.hash_to_page:
                    self.hash_to_page[h] = page
                    self.page_hash[page] = h
                    self.page_key[page] = key
            s.length += take
            s.open_ids = ids
            done += take
        return plan

    def _lookup(
        self, s: _Seq, ids: list[int] | None
    ) -> tuple[tuple[int, tuple[int, ...]] | None, int | None, int | None]:
        """Key, hash and the stored page (or None) of the page ``s`` is about to fill."""
        index = s.length // self.page_size  # the filling page's index in the table
        parent = s.table[index - 1] if index else -1
        parent_hash = self.page_hash[parent] if index else 0
        if ids is None or parent_hash is None:
            return None, None, None
        key = (parent, tuple(ids))
        h = hash((parent_hash, key[1]))
        self.lookups += 1
        page = self.hash_to_page.get(h)
        if page is not None and self.page_key[page] == key:
            self.hits += 1
            return key, h, page
        return key, h, None

    def _writable(self, s: _Seq, off: int, plan: AppendPlan) -> int:
        """The page ``s`` writes its next token into, private to it (allocated or copied)."""
        if off == 0:
            page = self._alloc(s.table[-1] + 1 if s.table else None)
            s.push(page)
            return page
        page = s.table[-1]
        if self.refcount[page] == 1:
            return page
        s.pop()
        copy = self._alloc(s.table[-1] + 1 if s.table else None)
        plan.copies.append((page, copy, off))
        self.fill[copy] = off
        self._release(page)
        s.push(copy)
        return copy

    # --- invariants ----------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``AssertionError`` if an invariant of the module docstring does not hold."""
        ps = self.page_size
        refs = [0] * self.capacity
        fills: dict[int, int] = {}
        for sid, s in self._seqs.items():
            assert len(s.table) == -(-s.length // ps), f"seq {sid}: table/length mismatch"
            assert len(set(s.table)) == len(s.table), f"seq {sid}: a page twice in one table"
            assert [p for a, n in s.runs for p in range(a, a + n)] == s.table, f"seq {sid}: runs"
            for i, p in enumerate(s.table):
                refs[p] += 1
                want = min(ps, s.length - i * ps)
                assert fills.setdefault(p, want) == want, f"page {p}: tables disagree on its fill"
                key = self.page_key[p]
                if key is not None:
                    assert key[0] == (s.table[i - 1] if i else -1), f"page {p}: parent not before it"
        for p in range(self.capacity):
            free = p in self._free
            assert free == (self.refcount[p] == 0), f"page {p}: free={free}, refcount={self.refcount[p]}"
            assert self.refcount[p] == refs[p], f"page {p}: refcount {self.refcount[p]} != {refs[p]} refs"
            assert self.fill[p] == fills.get(p, 0), f"page {p}: fill {self.fill[p]}"
            h = self.page_hash[p]
            assert (h is None) == (self.page_key[p] is None), f"page {p}: hash without key"
            if h is not None:
                assert not free and self.fill[p] == ps, f"page {p}: hashed but free or partial"
                assert self.hash_to_page.get(h) == p, f"page {p}: hash does not map back"
        assert all(self.page_hash[p] == h for h, p in self.hash_to_page.items()), "stale hash entry"
        assert set(self._free) <= set(self._free_heap), "a free page missing from the heap"
        assert 0 <= self.hits <= self.lookups
