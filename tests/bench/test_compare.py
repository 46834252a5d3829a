"""``memfusion bench compare``: cell-by-cell differences against figures computed by hand."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memfusion.bench.compare import compare, render
from memfusion.bench.metrics import rate, wilson
from memfusion.cli import app
from memfusion.errors import InvalidInput

FIXTURE = Path(__file__).parent / "fixtures" / "task_results.jsonl"


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A = the fixture; B = the fixture with niah_single/dense/256 at 20/20 vs A's 0/20, its KV halved,
    its decode steps doubled, one cell dropped and one added."""
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    a_records = [dict(r) for r in records]
    target = next(r for r in a_records if r.get("key") == "niah_single/dense/256/-")
    target["metrics"] = {**target["metrics"], "accuracy": asdict(rate([0.0] * 20))}
    b_records = json.loads(json.dumps(a_records))
    bt = next(r for r in b_records if r.get("key") == "niah_single/dense/256/-")
    bt["metrics"]["accuracy"] = asdict(rate([1.0] * 20))
    bt["metrics"]["kv"]["resident"]["mean"] /= 2
    bt["metrics"]["latency_ms"]["decode"]["median"] *= 2
    b_records = [r for r in b_records if r.get("key") != "kv_lookup/quest/256/0.25"]
    extra = json.loads(json.dumps(bt))
    extra["key"] = "niah_single/dense/1024/-"
    b_records.append(extra)
    return _write(tmp_path / "a", a_records), _write(tmp_path / "b", b_records)


def test_differences_and_significance_by_hand(pair: tuple[Path, Path]) -> None:
    c = compare(*pair)
    by = {d.key: d for d in c.diffs}
    d = by["niah_single/dense/256/-"]
    assert d.accuracy_delta == 1.0 and d.significant  # Wilson(0, 20) and Wilson(20, 20) are disjoint
    assert wilson(0, 20)[1] < wilson(20, 20)[0]
    assert d.kv_mb_delta == pytest.approx(-131072 / 2 / 1e6)
    assert d.decode_ms_delta == pytest.approx(2.0)  # A's median decode step is 2 ms, B's 4 ms
    same = by["niah_single/dense/512/-"]
    assert (same.accuracy_delta, same.significant, same.kv_mb_delta, same.decode_ms_delta) == (0.0, False, 0.0, 0.0)
    assert c.only_a == ["kv_lookup/quest/256/0.25"] and c.only_b == ["niah_single/dense/1024/-"]
    assert c.failed == ["niah_single/window/512/0.25"]
    text = render(c)
    assert "+1.00*" in text and "(0.50x)" in text and "(2.00x)" in text
    assert f"{len(c.diffs)} cells compared, 1 significant" in text


def test_overlapping_intervals_are_not_significant(tmp_path: Path) -> None:
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    b = json.loads(json.dumps(records))
    # niah_single/dense/512: 1 of 4 in A; 2 of 4 in B: Wilson intervals overlap
    next(r for r in b if r.get("key") == "niah_single/dense/512/-")["metrics"]["accuracy"] = asdict(rate([1, 1, 0, 0]))
    c = compare(_write(tmp_path / "a", records), _write(tmp_path / "b", b))
    d = next(x for x in c.diffs if x.key == "niah_single/dense/512/-")
    assert d.accuracy_delta == 0.25 and not d.significant


def test_mismatched_schema_is_a_clear_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = pair
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    records[0]["schema"] = 0
    old = _write(tmp_path / "old", records)
    with pytest.raises(InvalidInput, match="schema 0"):
        compare(a, old)
    result = CliRunner().invoke(app, ["bench", "compare", str(a), str(old)])
    assert result.exit_code == 2 and "schema 0" in " ".join(result.output.split())  # rich may wrap lines


def test_cli_prints_the_differences(pair: tuple[Path, Path]) -> None:
    result = CliRunner().invoke(app, ["bench", "compare", str(pair[0]), str(pair[1] / "results.jsonl")])
    assert result.exit_code == 0, result.output
    assert "niah_single/dense/256/-" in result.output and "only in A: kv_lookup/quest/256/0.25" in result.output
