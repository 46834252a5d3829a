"""The DNC paper's graph tasks (Graves et al. 2016) on small random graphs: traversal and shortest path.

A graph has ``n`` nodes (drawn from ``[min_nodes, max_nodes]``) named by distinct random ids
from ``range(n_ids)`` (so a model cannot rely on fixed node numbers) and labelled directed edges:
every node has between ``min_out_degree`` and ``max_out_degree`` outgoing edges, no self-loops,
with distinct destinations and distinct labels from ``range(n_labels)``. Following a label from a
node is therefore deterministic, and a path is named by its edges without ambiguity.

A sequence has three phases, and every step carries one flag saying which:

1. *graph*: one edge ``(source, label, destination)`` per step, in a random order;
2. *query*: traversal: ``h`` steps, the first with the start node and the first label, then one
   label per step; shortest path: one step with the start and the end node;
3. *answer*: zero inputs except the answer flag; the targets are, for traversal, the node reached
   after each label (one one-hot group of ``n_ids``), for shortest path, the path's edges as
   triples (three one-hot groups: source id, label, destination id). Shortest-path queries are
   drawn only among pairs whose shortest path is unique, so the target is unambiguous.

Input step layout (I = 2 n_ids + n_labels + 3): ``[source | label | destination | graph flag |
query flag | answer flag]``. Rows of a batch differ in length: each is laid out from t = 0 and
padded at the end; ``mask`` is 1 on answer steps only. Randomness comes from the ``torch.Generator``
passed to ``batch``. Graph building runs in Python per row: keep graphs small (they are meant to
train on a CPU).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from memfusion.bench.tasks.algorithmic import SeqBatch
from memfusion.errors import InvalidInput

_GRAPH, _QUERY, _ANSWER = 0, 1, 2  # offsets of the phase flags after the three fields


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclasses.dataclass(frozen=True)
class GraphBatch(SeqBatch):
    """A :class:`SeqBatch` whose targets are one-hot groups: ``groups`` gives their sizes, in order
    (they sum to O). An answer step is right when every group's argmax is right."""

    groups: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(
            sum(self.groups) == self.targets.shape[-1], f"groups {self.groups} must sum to O = {self.targets.shape[-1]}"
        )


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """The random-graph family; see the module docstring for the invariants every graph satisfies."""

    min_nodes: int = 5
    max_nodes: int = 8
    n_ids: int = 16
    n_labels: int = 4
    min_out_degree: int = 1
    max_out_degree: int = 2

    def __post_init__(self) -> None:
        _need(
            2 <= self.min_nodes <= self.max_nodes,
            f"need 2 <= min_nodes <= max_nodes, got {self.min_nodes}, {self.max_nodes}",
        )
        _need(self.n_ids >= self.max_nodes, f"n_ids ({self.n_ids}) must be >= max_nodes ({self.max_nodes})")
        _need(
            1 <= self.min_out_degree <= self.max_out_degree,
            f"need 1 <= min_out_degree <= max_out_degree, got {self.min_out_degree}, {self.max_out_degree}",
        )
        _need(
            self.max_out_degree <= min(self.n_labels, self.min_nodes - 1),
            f"max_out_degree ({self.max_out_degree}) must be <= n_labels ({self.n_labels}) and <= "
            f"min_nodes - 1 ({self.min_nodes - 1}): out-edges need distinct labels and distinct destinations",
        )

    @property
    def input_size(self) -> int:
        return 2 * self.n_ids + self.n_labels + 3

    def sample(self, generator: torch.Generator) -> tuple[list[int], list[tuple[int, int, int]]]:
        """One graph: the ids of its nodes (node i has id ``ids[i]``) and its edges as local
        ``(source, label, destination)`` triples, sorted by source then label."""
        n = int(torch.randint(self.min_nodes, self.max_nodes + 1, (1,), generator=generator))
        ids = torch.randperm(self.n_ids, generator=generator)[:n].tolist()
        edges: list[tuple[int, int, int]] = []
        for u in range(n):
            d = int(torch.randint(self.min_out_degree, self.max_out_degree + 1, (1,), generator=generator))
            labels = torch.randperm(self.n_labels, generator=generator)[:d].tolist()
            others = [v for v in range(n) if v != u]
            picks = torch.randperm(n - 1, generator=generator)[:d].tolist()
            edges.extend((u, lab, others[p]) for lab, p in sorted(zip(labels, picks, strict=True)))
        return ids, edges


def _bfs(n: int, edges: list[tuple[int, int, int]], start: int) -> tuple[list[int], list[int], list[int]]:
    """Distances from ``start`` (-1 if unreachable), the number of shortest paths to each node and
    one predecessor edge index on a shortest path (-1 for the start / unreachable nodes)."""
    out: list[list[int]] = [[] for _ in range(n)]
    for i, (u, _, _) in enumerate(edges):
        out[u].append(i)
    dist, count, pred = [-1] * n, [0] * n, [-1] * n
    dist[start], count[start] = 0, 1
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for i in out[u]:
            v = edges[i][2]
            if dist[v] == -1:
                dist[v], pred[v] = dist[u] + 1, i
                queue.append(v)
            if dist[v] == dist[u] + 1:
                count[v] += count[u]
    return dist, count, pred


_Row = tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], list[tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class GraphTask(ABC):
    """Shared layout: turns per-row (edges, query steps, answers) of ids into a :class:`GraphBatch`."""

    name: ClassVar[str]
    graph: GraphSpec = dataclasses.field(default_factory=GraphSpec)
    min_hops: int = 1
    max_hops: int = 3

    def __post_init__(self) -> None:
        _need(
            1 <= self.min_hops <= self.max_hops, f"need 1 <= min_hops <= max_hops, got {self.min_hops}, {self.max_hops}"
        )

    @property
    def input_size(self) -> int:
        return self.graph.input_size

    @property
    @abstractmethod
    def groups(self) -> tuple[int, ...]:
        """The sizes of the target's one-hot groups."""

    @property
    def output_size(self) -> int:
        return sum(self.groups)

    @abstractmethod
    def _row(self, hops: int, generator: torch.Generator) -> _Row:
        """One row: the edges (id triples, presentation order), the query steps and the answers."""

    def _check_hops(self, hops: int) -> None:
        """Raise for a number of hops this task cannot produce."""
        _need(hops >= 1, f"the number of hops must be >= 1, got {hops}")

    def batch(self, batch_size: int, generator: torch.Generator, length: int | None = None) -> GraphBatch:
        """``batch_size`` rows; the number of hops is drawn from ``[min_hops, max_hops]`` per row, or is ``length``."""
        _need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        if length is None:
            hops = torch.randint(self.min_hops, self.max_hops + 1, (batch_size,), generator=generator).tolist()
        else:
            self._check_hops(length)
            hops = [length] * batch_size
        rows = [self._row(h, generator) for h in hops]
        return self._encode(rows)

    def _encode(self, rows: list[_Row]) -> GraphBatch:
        spec = self.graph
        v, lab = spec.n_ids, spec.n_labels
        flags = 2 * v + lab
        steps = max(len(e) + len(q) + len(a) for e, q, a in rows)
        b = len(rows)
        offsets = [0, v, v + lab]  # where source, label and destination start in an input step
        hot_in: list[tuple[int, int, int]] = []  # (row, time, channel) of every 1 in the inputs
        hot_out: list[tuple[int, int, int]] = []  # the same for the targets (answer steps only)
        for r, (edges, query, answers) in enumerate(rows):
            t = 0
            for phase, triples in ((_GRAPH, edges), (_QUERY, query)):
                for triple in triples:
                    hot_in.extend((r, t, offsets[f] + x) for f, x in enumerate(triple) if x >= 0)
                    hot_in.append((r, t, flags + phase))
                    t += 1
            for ans in answers:
                hot_in.append((r, t, flags + _ANSWER))
                starts = [sum(self.groups[:g]) for g in range(len(self.groups))]
                hot_out.extend((r, t, s + x) for s, x in zip(starts, ans, strict=True))
                t += 1
        inputs = torch.zeros(b, steps, spec.input_size)  # (B, T, I)
        targets = torch.zeros(b, steps, self.output_size)  # (B, T, O)
        inputs[tuple(torch.tensor(hot_in).T)] = 1.0
        targets[tuple(torch.tensor(hot_out).T)] = 1.0
        mask = targets.amax(dim=-1)  # (B, T): every answer step has a hot target
        return GraphBatch(inputs, targets, mask, self.groups)


@dataclasses.dataclass(frozen=True)
class Traversal(GraphTask):
    """Traversal: from a start node follow ``h`` edge labels; answer the node id after each label.

    The query's ``h`` steps are ``(start, label_1, -)`` then ``(-, label_j, -)``; the labels are
    those of a random walk, so the path always exists. O = n_ids (one group)."""

    name: ClassVar[str] = "traversal"
    max_hops: int = 4

    @property
    def groups(self) -> tuple[int, ...]:
        return (self.graph.n_ids,)

    def _row(self, hops: int, generator: torch.Generator) -> _Row:
        ids, edges = self.graph.sample(generator)
        out: dict[int, list[tuple[int, int, int]]] = {}
        for e in edges:
            out.setdefault(e[0], []).append(e)
        node = int(torch.randint(len(ids), (1,), generator=generator))
        query: list[tuple[int, int, int]] = []
        answers: list[tuple[int, ...]] = []
        for j in range(hops):
            options = out[node]
            _, label, nxt = options[int(torch.randint(len(options), (1,), generator=generator))]
            query.append((ids[node] if j == 0 else -1, label, -1))
            answers.append((ids[nxt],))
            node = nxt
        return _shuffled(ids, edges, generator), query, answers


@dataclasses.dataclass(frozen=True)
class ShortestPath(GraphTask):
    """Shortest path: the query ``(start, -, end)``; answer the edges of the (unique) shortest path,
    one ``(source id, label, destination id)`` triple per step. O = 2 n_ids + n_labels.

    Rows are drawn by rejection (another start node, then another graph) until a pair with a
    unique shortest path of the wanted number of hops exists; ``max_attempts`` graphs per row
    bound that search, after which the configuration is reported as infeasible."""

    name: ClassVar[str] = "shortest_path"
    max_attempts: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")
        self._check_hops(self.max_hops)

    def _check_hops(self, hops: int) -> None:
        super()._check_hops(hops)
        _need(
            hops <= self.graph.max_nodes - 1,
            f"a {hops}-hop path needs {hops + 1} nodes but max_nodes = {self.graph.max_nodes}; "
            f"use hops <= {self.graph.max_nodes - 1} or larger graphs",
        )

    @property
    def groups(self) -> tuple[int, ...]:
        return (self.graph.n_ids, self.graph.n_labels, self.graph.n_ids)

    def _row(self, hops: int, generator: torch.Generator) -> _Row:
        for _ in range(self.max_attempts):
            ids, edges = self.graph.sample(generator)
            n = len(ids)
            for start in torch.randperm(n, generator=generator).tolist():
                dist, count, pred = _bfs(n, edges, start)
                ends = [u for u in range(n) if dist[u] == hops and count[u] == 1]
                if not ends:
                    continue
                end = ends[int(torch.randint(len(ends), (1,), generator=generator))]
                path: list[tuple[int, int, int]] = []
                node = end
                while node != start:
                    u, label, w = edges[pred[node]]
                    path.append((ids[u], label, ids[w]))
                    node = u
                query = [(ids[start], -1, ids[end])]
                return _shuffled(ids, edges, generator), query, [tuple(p) for p in reversed(path)]
        raise InvalidInput(
            f"found no node pair with a unique {hops}-hop shortest path in {self.max_attempts} random graphs; "
            f"use fewer hops or larger graphs (max_nodes={self.graph.max_nodes})"
        )


def _shuffled(
    ids: list[int], edges: list[tuple[int, int, int]], generator: torch.Generator
) -> list[tuple[int, int, int]]:
    """The edges as id triples, in a random presentation order."""
    order = torch.randperm(len(edges), generator=generator).tolist()
    return [(ids[edges[i][0]], edges[i][1], ids[edges[i][2]]) for i in order]


GRAPH_TASKS: dict[str, type[GraphTask]] = {"traversal": Traversal, "shortest_path": ShortestPath}


def graph_task(name: str, **params: Any) -> GraphTask:
    """The task registered under ``name`` (a key of :data:`GRAPH_TASKS`), configured with ``params``."""
    if name not in GRAPH_TASKS:
        raise InvalidInput(f"unknown graph task {name!r}; valid: {', '.join(sorted(GRAPH_TASKS))}")
    try:
        return GRAPH_TASKS[name](**params)
    except TypeError as e:
        raise InvalidInput(f"bad parameters for {name!r}: {e}") from None


def _step_correct(logits: Tensor, batch: GraphBatch) -> Tensor:
    """(B, T) bool: every one-hot group's argmax agrees with the target's."""
    _need(
        logits.shape == batch.targets.shape,
        f"logits must have the targets' shape {tuple(batch.targets.shape)}, got {tuple(logits.shape)}",
    )
    ok = torch.ones(batch.mask.shape, dtype=torch.bool)
    for lg, tg in zip(
        logits.split(list(batch.groups), dim=-1), batch.targets.split(list(batch.groups), dim=-1), strict=True
    ):
        ok &= lg.argmax(-1) == tg.argmax(-1)  # (B, T)
    return ok


def step_accuracy(logits: Tensor, batch: GraphBatch) -> float:
    """The fraction of answer steps (over the whole batch) that are right."""
    ok = _step_correct(logits, batch)
    m = batch.mask > 0
    return float(ok[m].float().mean())


def sequence_accuracy(logits: Tensor, batch: GraphBatch) -> float:
    """The fraction of sequences whose every answer step is right."""
    ok = _step_correct(logits, batch) | (batch.mask <= 0)  # (B, T) padding and input steps count as right
    return float(ok.all(dim=1).float().mean())


def cross_entropy(logits: Tensor, batch: GraphBatch) -> Tensor:
    """The sum over one-hot groups of the cross-entropy, averaged over answer steps (a scalar)."""
    _need(
        logits.shape == batch.targets.shape,
        f"logits must have the targets' shape {tuple(batch.targets.shape)}, got {tuple(logits.shape)}",
    )
    m = batch.mask > 0  # (B, T)
    total = logits.new_zeros(())
    for lg, tg in zip(
        logits.split(list(batch.groups), dim=-1), batch.targets.split(list(batch.groups), dim=-1), strict=True
    ):
        total = total + F.cross_entropy(lg[m], tg[m].argmax(-1), reduction="sum")
    return total / m.sum().clamp(min=1)
