"""The task report on a fixture results file: tables against hand-computed figures, plots, self-contained HTML."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest

from memfusion.bench import taskreport
from memfusion.bench.metrics import wilson

FIXTURE = Path(__file__).parent / "fixtures" / "task_results.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    shutil.copy(FIXTURE, d / "results.jsonl")
    return taskreport.build(d)


def test_tables_hold_hand_computed_figures(built: dict[str, Path]) -> None:
    md = built["md"].read_text()
    sections = re.split(r"^## ", md, flags=re.M)
    assert [s.split("\n")[0] for s in sections[1:4]] == ["common_words", "kv_lookup", "niah_single"]
    # niah_single / dense / 256: scores 1, 0, 1, 1 -> 0.75 with Wilson(3, 4); KV 131072 B; decode steps 1, 2, 3 ms x 4
    low, high = wilson(3, 4)
    row = next(line for line in md.splitlines() if line.startswith("| dense | all | 256 |") and "0.75" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"0.75 [{low:.2f}, {high:.2f}] (n=4)"
    assert cells[4] == "0.131" and cells[5] == f"{(131072 + 4096) / 1e6:.3f}"
    assert cells[6] == "2.00 [1.00-3.00] (n=12)"
    # tokens/s: 4 requests x 4 tokens over 4 x (0.02 + 0.006) s
    assert cells[7] == f"{16 / (4 * 0.026):.1f}"
    # partial scores (common_words, recall scorer) 0.5 and 0.25 -> mean 0.375
    assert "| dense | all | 256 | 0.38 [" in sections[1]
    assert "| quest | 0.25 | 256 | 1.00 [" in md and "| 0.80 |" in md  # page recall
    assert "| window | 0.25 | 512 | FAILED: RuntimeError: boom |" in md


def test_header_says_the_model_is_random_and_names_machine_and_versions(built: dict[str, Path]) -> None:
    md = built["md"].read_text()
    assert "- **model**: random (RANDOM WEIGHTS" in md
    assert "- **seed**: 0" in md and "torch 2.13.0" in md and "cores 2" in md
    assert "- **cells**: 6 finished, 1 failed" in md


def test_retention_table_by_distance(built: dict[str, Path]) -> None:
    md = built["md"].read_text()
    table = md.split("## retention by distance")[1].split("## plots")[0]
    # needle samples only (common_words has none); the largest distance is 450 -> bins of 112.5 tokens
    assert "| policy | 0-112 | 112-225 | 225-338 | 338-450 |" in table
    # window (256): distances 200, 130, 70, 5 with scores 0, 0, 0, 1 -> bin 0 holds 70 and 5 -> 0.50 (n=2)
    window = next(line for line in table.splitlines() if line.startswith("| window |"))
    assert window.split("|")[2].strip().startswith("0.50 [") and "(n=2)" in window.split("|")[2]


def test_every_plot_is_written_as_png(built: dict[str, Path]) -> None:
    expected = {"accuracy_vs_budget", "kv_vs_length", "latency_vs_length", "heatmap_dense", "heatmap_quest"}
    expected.add("heatmap_window")  # window has one finished cell (256) and one failed (512)
    assert set(built) == {"md", "html", *expected}
    for name in expected:
        data = built[name].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        assert f"]({built[name].name})" in built["md"].read_text()


def test_html_is_self_contained_with_the_plots_embedded(built: dict[str, Path]) -> None:
    page = built["html"].read_text()
    assert "<link" not in page and "<script" not in page and "http://" not in page and "https://" not in page
    blobs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    images = [p for k, p in built.items() if k not in ("md", "html")]
    assert len(blobs) == len(images) == 6
    assert sorted(base64.b64decode(b) for b in blobs) == sorted(p.read_bytes() for p in images)
    assert "FAILED: RuntimeError: boom" in page and "RANDOM WEIGHTS" in page


def test_a_truncated_last_line_still_gives_a_report(tmp_path: Path) -> None:
    text = FIXTURE.read_text()
    (tmp_path / "results.jsonl").write_text(text + '{"type": "cell", "key": "half')
    paths = taskreport.build(tmp_path / "results.jsonl", tmp_path / "out")
    assert paths["md"].parent == tmp_path / "out" and "- **cells**: 6 finished" in paths["md"].read_text()
