"""The DNC graph tasks: answers re-derived from the presented edges by an independent search."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch

from memfusion.bench.tasks.graphs import (
    GRAPH_TASKS,
    GraphBatch,
    GraphSpec,
    ShortestPath,
    Traversal,
    cross_entropy,
    graph_task,
    sequence_accuracy,
    step_accuracy,
)
from memfusion.errors import InvalidInput

SPEC = GraphSpec(min_nodes=4, max_nodes=7, n_ids=10, n_labels=3, min_out_degree=1, max_out_degree=2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hot(vec: torch.Tensor) -> int | None:
    """The index of the single 1 in a one-hot slice, or None for an all-zero slice."""
    on = torch.nonzero(vec).flatten().tolist()
    assert len(on) <= 1 and all(vec[i] == 1.0 for i in on)
    return on[0] if on else None


def decode(b: GraphBatch, r: int, spec: GraphSpec) -> tuple[list, list, list]:
    """(edges, query steps, answer steps) of row r, read back from the one-hot encoding."""
    v, lab = spec.n_ids, spec.n_labels
    flags = 2 * v + lab
    phases: dict[int, list] = {0: [], 1: [], 2: []}
    order = []
    for t in range(b.steps):
        x = b.inputs[r, t]
        phase = hot(x[flags:])
        if phase is None:
            assert float(x.abs().sum()) == 0.0 and b.mask[r, t] == 0.0
            continue
        order.append(phase)
        fields = (hot(x[:v]), hot(x[v : v + lab]), hot(x[v + lab : flags]))
        if phase == 2:
            assert fields == (None, None, None) and b.mask[r, t] == 1.0
            ys, start = [], 0
            for size in b.groups:
                ys.append(hot(b.targets[r, t, start : start + size]))
                start += size
            phases[2].append(tuple(ys))
        else:
            assert b.mask[r, t] == 0.0 and float(b.targets[r, t].abs().sum()) == 0.0
            phases[phase].append(fields)
    assert order == sorted(order), "graph, then query, then answer"
    return phases[0], phases[1], phases[2]


def check_graph(edges: list, spec: GraphSpec) -> None:
    nodes = {u for u, _, _ in edges} | {w for _, _, w in edges}
    assert spec.min_nodes <= len(nodes) <= spec.max_nodes
    sources = {u for u, _, _ in edges}
    assert sources == nodes, "every node has an outgoing edge"
    for u in sources:
        out = [(lab, w) for s, lab, w in edges if s == u]
        assert spec.min_out_degree <= len(out) <= spec.max_out_degree
        assert len({lab for lab, _ in out}) == len(out) and len({w for _, w in out}) == len(out)
        assert all(w != u for _, w in out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_traversal_answers_follow_the_labels(seed: int) -> None:
    task = Traversal(graph=SPEC, min_hops=1, max_hops=5)
    b = task.batch(24, gen(seed))
    assert b.groups == (SPEC.n_ids,)
    for r in range(24):
        edges, query, answers = decode(b, r, SPEC)
        check_graph(edges, SPEC)
        follow = {(u, lab): w for u, lab, w in edges}
        assert query[0][0] is not None and all(q[0] is None and q[2] is None for q in query[1:])
        node = query[0][0]
        visited = []
        for _, lab, _ in query:
            node = follow[(node, lab)]
            visited.append((node,))
        assert answers == visited
        assert 1 <= len(answers) <= 5


def all_shortest_paths(edges: list, start: int, end: int) -> tuple[int, list[list[tuple]]]:
    """BFS distance, then every path of that many edges from start to end (brute-force enumeration)."""
    dist = {start: 0}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for s, _, w in edges:
            if s == u and w not in dist:
                dist[w] = dist[u] + 1
                queue.append(w)
    d = dist[end]
    paths: list[list[tuple]] = []

    def walk(u: int, path: list[tuple]) -> None:
        if len(path) == d:
            if u == end:
                paths.append(path)
            return
        for e in edges:
            if e[0] == u:
                walk(e[2], [*path, e])

    walk(start, [])
    return d, paths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shortest_path_answers_are_the_unique_shortest_path(seed: int) -> None:
    task = ShortestPath(graph=SPEC, min_hops=1, max_hops=4)
    b = task.batch(24, gen(seed))
    assert b.groups == (SPEC.n_ids, SPEC.n_labels, SPEC.n_ids)
    hops = set()
    for r in range(24):
        edges, query, answers = decode(b, r, SPEC)
        check_graph(edges, SPEC)
        assert len(query) == 1 and query[0][1] is None
        start, end = query[0][0], query[0][2]
        d, paths = all_shortest_paths(edges, start, end)
        assert len(paths) == 1
        assert answers == paths[0] and len(answers) == d
        hops.add(d)
    assert len(hops) > 1


def test_length_fixes_the_hops() -> None:
    b = ShortestPath(graph=SPEC, max_hops=3).batch(6, gen(0), length=5)
    assert b.mask.sum(1).tolist() == [5.0] * 6
    b = Traversal(graph=SPEC).batch(6, gen(0), length=9)
    assert b.mask.sum(1).tolist() == [9.0] * 6


@pytest.mark.parametrize("name", sorted(GRAPH_TASKS))
def test_sizes_and_determinism(name: str) -> None:
    task = graph_task(name, graph=SPEC)
    a, b, c = task.batch(8, gen(4)), task.batch(8, gen(4)), task.batch(8, gen(5))
    assert a.inputs.shape[-1] == task.input_size == 2 * SPEC.n_ids + SPEC.n_labels + 3
    assert a.targets.shape[-1] == task.output_size
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask)
    assert a.inputs.shape != c.inputs.shape or not torch.equal(a.inputs, c.inputs)
    assert max(int(torch.nonzero(a.mask[r]).max()) for r in range(8)) == a.steps - 1


def test_to_keeps_the_type_and_the_groups() -> None:
    b = Traversal(graph=SPEC).batch(2, gen(0))
    moved = b.to("cpu")
    assert type(moved) is GraphBatch and moved.groups == b.groups and torch.equal(moved.inputs, b.inputs)


def tiny() -> GraphBatch:
    """2 rows, 3 steps, groups (3, 2): answers at steps 1, 2 of row 0 and step 2 of row 1."""
    t = torch.zeros(2, 3, 5)
    t[0, 1, 2] = t[0, 1, 3] = 1.0  # (2, 0)
    t[0, 2, 0] = t[0, 2, 4] = 1.0  # (0, 1)
    t[1, 2, 1] = t[1, 2, 4] = 1.0  # (1, 1)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    return GraphBatch(torch.zeros(2, 3, 1), t, mask, (3, 2))


def test_scorers_on_a_hand_computed_case() -> None:
    b = tiny()
    logits = torch.zeros(2, 3, 5)
    logits[0, 1] = torch.tensor([0.0, 0.0, 2.0, 1.0, 0.0])  # (2, 0): right
    logits[0, 2] = torch.tensor([3.0, 0.0, 0.0, 1.0, 0.0])  # (0, 0): second group wrong
    logits[1, 2] = torch.tensor([0.0, 5.0, 0.0, 0.0, 1.0])  # (1, 1): right
    logits[1, 0] = torch.tensor([9.0, 0.0, 0.0, 9.0, 0.0])  # not an answer step: ignored
    assert step_accuracy(logits, b) == pytest.approx(2 / 3)
    assert sequence_accuracy(logits, b) == 0.5
    logits[0, 2, 4] = 2.0
    assert step_accuracy(logits, b) == 1.0 and sequence_accuracy(logits, b) == 1.0


def test_cross_entropy_matches_the_formula() -> None:
    b = tiny()
    logits = torch.randn(2, 3, 5, generator=gen(0))

    def ce(z: list[float], k: int) -> float:
        return -(z[k] - math.log(sum(math.exp(v) for v in z)))

    total = 0.0
    for r, t in [(0, 1), (0, 2), (1, 2)]:
        z = logits[r, t].tolist()
        y = b.targets[r, t].tolist()
        total += ce(z[:3], y[:3].index(1.0)) + ce(z[3:], y[3:].index(1.0))
    assert cross_entropy(logits, b).item() == pytest.approx(total / 3, rel=1e-5)


def test_bad_input() -> None:
    with pytest.raises(InvalidInput, match="min_nodes"):
        GraphSpec(min_nodes=1)
    with pytest.raises(InvalidInput, match="n_ids"):
        GraphSpec(max_nodes=8, n_ids=7)
    with pytest.raises(InvalidInput, match="max_out_degree"):
        GraphSpec(n_labels=2, max_out_degree=3)
    with pytest.raises(InvalidInput, match="min_hops"):
        Traversal(min_hops=0)
    with pytest.raises(InvalidInput, match="max_nodes"):
        ShortestPath(graph=SPEC, max_hops=7)
    with pytest.raises(InvalidInput, match="max_nodes"):
        ShortestPath(graph=SPEC).batch(2, gen(0), length=9)
    with pytest.raises(InvalidInput, match="hops"):
        Traversal().batch(2, gen(0), length=0)
    with pytest.raises(InvalidInput, match="batch_size"):
        Traversal().batch(0, gen(0))
    with pytest.raises(InvalidInput, match="unknown graph task 'bfs'"):
        graph_task("bfs")
    with pytest.raises(InvalidInput, match="bad parameters"):
        graph_task("traversal", hops=3)
    with pytest.raises(InvalidInput, match="shape"):
        step_accuracy(torch.zeros(2, 3, 4), tiny())
    # a complete 3-node digraph has no 2-hop shortest path: reported, not an endless search
    complete = GraphSpec(min_nodes=3, max_nodes=3, n_ids=3, n_labels=2, min_out_degree=2, max_out_degree=2)
    with pytest.raises(InvalidInput, match="unique 2-hop"):
        ShortestPath(graph=complete, min_hops=2, max_hops=2, max_attempts=5).batch(1, gen(0))
