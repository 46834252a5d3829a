"""The live view on its own: which row is live per key, in any application order, with lazy expiry.

Expectations are written by hand from the invariants in ``memfusion.store.live``.
"""

from __future__ import annotations

import numpy as np

from memfusion.store.index import ExactIndex
from memfusion.store.live import LiveView, RowChange


def vec(axis: int) -> np.ndarray:
    v = np.zeros(4, dtype=np.float32)
    v[axis] = 1.0
    return v


def view() -> LiveView:
    return LiveView(lambda: ExactIndex(4))


def test_the_newest_row_of_each_key_is_live_whatever_the_order() -> None:
    rows = [
        RowChange(1, "ns", "a", None, vec(0)),
        RowChange(2, "ns", "b", None, vec(1)),
        RowChange(3, "ns", "a", None, vec(2)),  # a's second version
        RowChange(4, "ns", "b", None, None),  # b deleted
        RowChange(5, "other", "a", None, vec(3)),
    ]
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 3, 1, 4]):
        v = view()
        for i in order:
            v.apply([rows[i]])
        v.apply(rows)  # repeats change nothing
        assert v.live_ids("ns").tolist() == [3]
        assert v.live_ids("other").tolist() == [5]
        assert v.live_ids("missing").tolist() == []


def test_one_batch_with_several_versions_of_a_key_keeps_only_the_newest() -> None:
    v = view()
    v.apply(
        [
            RowChange(1, "ns", "a", None, vec(0)),
            RowChange(2, "ns", "a", None, vec(1)),
            RowChange(3, "ns", "b", None, vec(2)),
        ]
    )
    assert v.live_ids("ns").tolist() == [2, 3]
    index = v.index("ns")
    assert index is not None and index.search(vec(1), 1)[0].tolist() == [2]


def test_expiry_is_lazy_and_a_clock_that_goes_back_is_refused() -> None:
    v = view()
    v.apply(
        [
            RowChange(1, "ns", "a", 100, vec(0)),
            RowChange(2, "ns", "b", 200, vec(1)),
            RowChange(3, "ns", "c", None, vec(2)),
        ]
    )
    assert v.expire("ns", 99) and v.live_ids("ns").tolist() == [1, 2, 3]
    assert v.expire("ns", 100) and v.live_ids("ns").tolist() == [2, 3]  # expires_at <= now: expired
    assert not v.expire("ns", 50)  # before the watermark: the caller must not use the view
    v.apply([RowChange(4, "ns", "b", None, vec(3))])  # b renewed before it expired
    assert v.expire("ns", 300) and v.live_ids("ns").tolist() == [3, 4]
    v.apply([RowChange(5, "ns", "d", 250, vec(0))])  # already expired at the watermark: never live
    assert v.live_ids("ns").tolist() == [3, 4]


def test_forget_and_reset() -> None:
    v = view()
    v.apply([RowChange(1, "ns", "a", None, vec(0)), RowChange(2, "ns", "b", None, vec(1))])
    v.forget("ns", [1])
    assert v.live_ids("ns").tolist() == [2]
    v.reset()
    assert v.namespaces() == [] and v.live_ids("ns").tolist() == []


def test_version_changes_with_every_change_of_the_namespace_and_never_repeats() -> None:
    v = view()
    seen = {v.version("ns")}
    for change in (
        lambda: v.apply([RowChange(1, "ns", "a", 100, vec(0))]),
        lambda: v.apply([RowChange(2, "ns", "a", None, None)]),  # a tombstone
        lambda: v.apply([RowChange(3, "ns", "b", 100, vec(1))]),
        lambda: v.expire("ns", 150),  # b expires
        v.reset,
        lambda: v.apply([RowChange(1, "ns", "a", 100, vec(0))]),  # the same rows again after a reset
    ):
        change()
        assert v.version("ns") not in seen
        seen.add(v.version("ns"))
    before = v.version("ns")
    v.apply([RowChange(1, "ns", "a", 100, vec(0))])  # a repeat changes nothing
    v.apply([RowChange(9, "other", "a", None, vec(0))])  # another namespace
    assert v.version("ns") == before
