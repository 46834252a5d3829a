"""``memfusion bench compare A B``: the differences of two task result sets, cell by cell.

Cells are matched by key ``(task, policy, length, budget)``. For each cell present and finished in
both: accuracy B - A with both Wilson 95% intervals, and whether the change is *significant*
(the two intervals do not overlap: a conservative test, roughly p < 0.01 for equal n), KV MB
resident B - A, decode ms/token (median) B - A, and the ratio B / A of both. Cells in only one
set, or failed in either, are listed separately. Both files must have this memfusion's results
schema (:func:`memfusion.bench.runner.read_results` refuses another).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfusion.bench.metrics import Rate
from memfusion.bench.runner import read_results, results_path

MB = 1e6


@dataclass(frozen=True)
class CellDiff:
    """One cell finished in both sets: A's and B's figures (None where a figure was not measured)."""

    key: str
    accuracy_a: Rate
    accuracy_b: Rate
    kv_mb_a: float
    kv_mb_b: float
    decode_ms_a: float | None
    decode_ms_b: float | None

    @property
    def accuracy_delta(self) -> float:
        return self.accuracy_b.value - self.accuracy_a.value

    @property
    def significant(self) -> bool:
        """True when the Wilson intervals of A and B do not overlap."""
        a, b = self.accuracy_a, self.accuracy_b
        return a.high < b.low or b.high < a.low

    @property
    def kv_mb_delta(self) -> float:
        return self.kv_mb_b - self.kv_mb_a

    @property
    def decode_ms_delta(self) -> float | None:
        if self.decode_ms_a is None or self.decode_ms_b is None:
            return None
        return self.decode_ms_b - self.decode_ms_a


@dataclass
class Comparison:
    """Every matched cell, and the keys found in only one set or failed in one."""

    a: Path
    b: Path
    header_a: dict[str, Any]
    header_b: dict[str, Any]
    diffs: list[CellDiff]
    only_a: list[str]
    only_b: list[str]
    failed: list[str]


def _rate(cell: dict[str, Any]) -> Rate:
    r = cell["metrics"]["accuracy"]
    return Rate(r["value"], r["n"], r["low"], r["high"])


def _decode(cell: dict[str, Any]) -> float | None:
    d = cell["metrics"]["latency_ms"]["decode"]
    return None if d is None else float(d["median"])


def compare(a: str | Path, b: str | Path) -> Comparison:
    """Match the cells of two result sets (directories or results.jsonl files)."""
    pa, pb = results_path(a), results_path(b)
    ha, ca = read_results(pa)
    hb, cb = read_results(pb)
    diffs, failed = [], []
    for key in sorted(ca.keys() & cb.keys()):
        x, y = ca[key], cb[key]
        if x["status"] != "ok" or y["status"] != "ok":
            failed.append(key)
            continue
        diffs.append(
            CellDiff(
                key=key,
                accuracy_a=_rate(x),
                accuracy_b=_rate(y),
                kv_mb_a=x["metrics"]["kv"]["resident"]["mean"] / MB,
                kv_mb_b=y["metrics"]["kv"]["resident"]["mean"] / MB,
                decode_ms_a=_decode(x),
                decode_ms_b=_decode(y),
            )
        )
    return Comparison(pa, pb, ha, hb, diffs, sorted(ca.keys() - cb.keys()), sorted(cb.keys() - ca.keys()), failed)


def _signed(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, "+" + fmt)


def _ratio(b: float | None, a: float | None) -> str:
    return "-" if a is None or b is None or a == 0 else f"{b / a:.2f}x"


def render(c: Comparison) -> str:
    """A plain-text report of :func:`compare` (``*`` marks significant accuracy changes)."""
    lines = [f"A: {c.a} (model {c.header_a['model']}, seed {c.header_a['seed']})"]
    lines.append(f"B: {c.b} (model {c.header_b['model']}, seed {c.header_b['seed']})")
    for name in ("model", "seed", "device", "batch"):
        if c.header_a.get(name) != c.header_b.get(name):
            lines.append(f"note: {name} differs ({c.header_a.get(name)!r} vs {c.header_b.get(name)!r})")
    head = f"{'cell (task/policy/length/budget)':44} {'accuracy A -> B':30} {'d acc':>7}  {'KV MB d (B/A)':>18}"
    lines += ["", head + f"  {'decode ms/tok d (B/A)':>22}"]
    for d in c.diffs:
        acc = (
            f"{d.accuracy_a.value:.2f}[{d.accuracy_a.low:.2f},{d.accuracy_a.high:.2f}] -> "
            f"{d.accuracy_b.value:.2f}[{d.accuracy_b.low:.2f},{d.accuracy_b.high:.2f}]"
        )
        mark = "*" if d.significant else " "
        kv = f"{_signed(d.kv_mb_delta, '.3f')} ({_ratio(d.kv_mb_b, d.kv_mb_a)})"
        dec = f"{_signed(d.decode_ms_delta, '.2f')} ({_ratio(d.decode_ms_b, d.decode_ms_a)})"
        lines.append(f"{d.key:44} {acc:30} {d.accuracy_delta:+7.2f}{mark} {kv:>18}  {dec:>22}")
    n_sig = sum(d.significant for d in c.diffs)
    lines += ["", f"{len(c.diffs)} cells compared, {n_sig} significant accuracy changes (* : Wilson 95% CIs disjoint)"]
    for label, keys in (("only in A", c.only_a), ("only in B", c.only_b), ("failed in A or B", c.failed)):
        if keys:
            lines.append(f"{label}: {', '.join(keys)}")
    return "\n".join(lines)
