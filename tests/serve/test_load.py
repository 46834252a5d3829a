"""The load benchmark, briefly (opt-in: ``-m slow``): 8 clients, a SIGKILL and a restart
mid-load, no error and no acknowledged write lost (``benchmarks/serve_load.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


@pytest.mark.slow
def test_load_benchmark_briefly(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "8", "--clients", "8", "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (row,) = json.loads(out.read_text())["runs"]
    assert row["backend"] == "sqlite" and row["killed"] is True
    assert row["requests"] > 0 and row["latency_ms"]["write"]["n"] > 0 and row["latency_ms"]["search"]["n"] > 0
    assert row["error_count"] == 0, row["errors"]
    assert row["acknowledged_writes"] > 0 and row["lost_writes"] == 0
    assert row["store_check_ok"] is True and row["graceful_exit_code"] == 0
