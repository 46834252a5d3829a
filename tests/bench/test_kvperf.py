"""memfusion bench end to end on small contexts: report files, and figures that must be exact."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from memfusion.bench.kvperf import Spread
from memfusion.cli import app


def test_spread_is_median_and_quartiles() -> None:
    s = Spread.of([0.001, 0.002, 0.003, 0.004, 0.100])
    assert s.median == 3.0 and s.n == 5
    assert s.p25 <= s.median <= s.p75


def test_bench_cli_writes_reports_with_exact_bytes(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "--suite", "kv-quick", "--contexts", "96", "--policies", "dense,window", "--out", str(tmp_path)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "kv-quick.json").read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "window"}
    # 4 layers x 2 KV heads x 64 dims x (K and V) x 4 bytes = 4096 bytes per token.
    seen = 96 + 16 - 1
    assert rows["dense"]["bytes_resident"] == rows["dense"]["analytic_bytes"] == seen * 4096
    window = rows["window"]["params"]["window"] + rows["window"]["params"]["sinks"]
    assert rows["window"]["bytes_resident"] == min(seen, window) * 4096
    assert rows["dense"]["decode_ms"]["median"] > 0 and data["baseline"]["96"]["median"] > 0
    md = (tmp_path / "kv-quick.md").read_text()
    assert "HF DynamicCache" in md and "torch" in md
    assert (tmp_path / "kv-quick.png").stat().st_size > 10_000


def test_bench_rejects_unknown_policy_and_suite(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--suite", "kv-quick", "--policies", "nope", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown policies" in bad.output
    bad = runner.invoke(app, ["bench", "--suite", "huge", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown suite" in bad.output
