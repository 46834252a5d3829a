"""The task runner on a tiny random Llama: results lines, exact KV bytes, resume, crashes, bad input, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memfusion.bench import runner
from memfusion.bench.metrics import rate
from memfusion.bench.suites import SUITES, Suite, get_suite, task_suite_name
from memfusion.bench.tasks import get_task
from memfusion.cli import app
from memfusion.errors import InvalidInput, NotFound
from memfusion.kv.stats import KVStats
from memfusion.models.tokenizer import build_tokenizer

# The random model: 2 layers x 2 KV heads x head_dim 16 x (K and V) x 4 bytes = 512 bytes per token.
BYTES_PER_TOKEN = 2 * 2 * 16 * 2 * 4

TINY = Suite(
    name="tiny",
    description="test grid",
    tasks=("niah_single",),
    policies=("dense", "window"),
    lengths=(256,),
    budgets=(0.25,),
    samples=2,
    new_tokens=4,
    prefill_chunk=128,
)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _flat(text: str) -> str:
    """Rich wraps long lines at the terminal width: compare with whitespace runs collapsed."""
    return " ".join(text.split())


def _run(out: Path, suite: Suite = TINY, **kw: Any) -> runner.RunSummary:
    return runner.run(runner.RunConfig(suite, out, **kw), report=False)


def test_results_file_has_a_header_and_one_exact_line_per_cell(tmp_path: Path) -> None:
    summary = _run(tmp_path)
    assert (summary.ran, summary.failed, summary.skipped, summary.interrupted) == (2, 0, 0, False)
    header, *cells = _lines(tmp_path / "results.jsonl")
    assert header["type"] == "header" and header["schema"] == runner.SCHEMA_VERSION
    assert (header["model"], header["model_random"], header["seed"], header["batch"]) == ("random", True, 0, 1)
    assert {"torch", "transformers", "memfusion"} <= set(header["versions"]) and header["suite"]["name"] == "tiny"
    assert (
        [c["key"] for c in cells]
        == [c.key for c in TINY.cells()]
        == ["niah_single/dense/256/-", "niah_single/window/256/0.25"]
    )
    tokenizer = build_tokenizer(runner.RANDOM_MAX_POSITIONS)
    samples = get_task("niah_single").generate(tokenizer, 256, 2, seed=0)
    for c in cells:
        assert c["status"] == "ok" and len(c["samples"]) == 2
        # every score is the task's own score of the recorded output; accuracy is their rate
        for row, sample in zip(c["samples"], samples, strict=True):
            assert row["score"] == get_task("niah_single").score(sample, row["output"])
            assert (row["depth"], row["distance"], row["n_tokens"]) == (sample.depth, sample.distance, sample.n_tokens)
        assert c["metrics"]["accuracy"]["value"] == rate(r["score"] for r in c["samples"]).value
        lat = c["metrics"]["latency_ms"]
        assert lat["prefill"]["n"] == 2 and lat["decode"]["n"] >= 2 and lat["decode"]["min"] > 0
        assert c["metrics"]["peak_rss_bytes"] > 0 and c["metrics"]["cuda_peak_bytes"] is None
    dense, window = cells
    # dense keeps every token seen: prompt + one per decode step (the last generated token is never fed)
    seen = sum(r["n_tokens"] for r in dense["samples"]) + dense["metrics"]["latency_ms"]["decode"]["n"]
    assert dense["metrics"]["kv"]["resident"]["mean"] * 2 == seen * BYTES_PER_TOKEN
    # window at budget 0.25 of 256 = 64 tokens (60 recent + 4 sinks), whatever the prompt length
    assert window["params"] == {"window": 60, "sinks": 4}
    assert window["metrics"]["kv"]["resident"]["max"] == 64 * BYTES_PER_TOKEN


def test_rerun_skips_finished_cells_and_runs_only_new_ones(tmp_path: Path) -> None:
    _run(tmp_path)
    before = (tmp_path / "results.jsonl").read_text()
    again = _run(tmp_path)
    assert (again.ran, again.skipped) == (0, 2)
    assert (tmp_path / "results.jsonl").read_text() == before
    wider = _run(tmp_path, TINY.select(policies=("dense", "window", "quest")))
    assert (wider.ran, wider.skipped) == (1, 2)
    _, cells = runner.read_results(tmp_path)
    assert sorted(cells) == sorted(c.key for c in TINY.select(policies=("dense", "window", "quest")).cells())
    quest = cells["niah_single/quest/256/0.25"]["metrics"]
    assert quest["page_recall"] is not None and 0.0 <= quest["page_recall"] <= 1.0
    assert 0.0 < quest["page_selection_ratio"] < 1.0


def test_a_crashing_cell_is_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = runner.decode_batch

    def flaky(loaded: Any, prompts: Any, policy: str, *args: Any) -> Any:
        if policy == "dense":
            raise RuntimeError("boom")
        return real(loaded, prompts, policy, *args)

    monkeypatch.setattr(runner, "decode_batch", flaky)
    summary = _run(tmp_path)
    assert (summary.ran, summary.failed) == (2, 1)
    _, cells = runner.read_results(tmp_path)
    failed, ok = cells["niah_single/dense/256/-"], cells["niah_single/window/256/0.25"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom" and "boom" in failed["traceback"]
    assert ok["status"] == "ok"
    monkeypatch.setattr(runner, "decode_batch", real)
    retry = _run(tmp_path)  # a failed cell runs again; its new line supersedes the old one
    assert (retry.ran, retry.failed, retry.skipped) == (1, 0, 1)
    assert runner.read_results(tmp_path)[1]["niah_single/dense/256/-"]["status"] == "ok"


def test_ctrl_c_leaves_the_finished_cells_and_their_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = runner.decode_batch

    def interrupted(loaded: Any, prompts: Any, policy: str, *args: Any) -> Any:
        if policy == "window":
            raise KeyboardInterrupt
        return real(loaded, prompts, policy, *args)

    monkeypatch.setattr(runner, "decode_batch", interrupted)
    summary = runner.run(runner.RunConfig(TINY, tmp_path))
    assert summary.interrupted and summary.ran == 1
    _, cells = runner.read_results(tmp_path)
    assert list(cells) == ["niah_single/dense/256/-"]
    md = summary.report["md"].read_text()
    assert "| dense | all | 256 |" in md and "window" not in md.split("## plots")[0]


def test_batched_decoding_counts_one_request_per_batch(tmp_path: Path) -> None:
    _run(tmp_path, TINY.select(policies=("dense",)), batch=2)
    _, cells = runner.read_results(tmp_path)
    m = cells["niah_single/dense/256/-"]["metrics"]
    assert m["latency_ms"]["prefill"]["n"] == 1 and m["kv"]["resident"]["n"] == 1
    assert m["throughput"]["tokens"] % 2 == 0  # two rows, the same number of steps each


def test_outputs_are_scored_against_their_own_samples_across_uneven_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder that writes each prompt's answer must score 1.0 on every sample (batch 2 over 3 samples)."""
    tokenizer = build_tokenizer(runner.RANDOM_MAX_POSITIONS)
    answer = {s.prompt: s.target for s in get_task("niah_single").generate(tokenizer, 256, 3, seed=0)}
    calls: list[int] = []

    def oracle(loaded: Any, prompts: Any, policy: str, *args: Any) -> runner.BatchResult:
        calls.append(len(prompts))
        texts = [" " + answer[p] + "." for p in prompts]
        return runner.BatchResult(
            texts, 0.01, [0.001] * 3, 4 * len(prompts), KVStats(policy, bytes_resident=1, peak_bytes=2)
        )

    monkeypatch.setattr(runner, "decode_batch", oracle)
    _run(tmp_path, replace(TINY.select(policies=("dense",)), samples=3), batch=2)
    cell = runner.read_results(tmp_path)[1]["niah_single/dense/256/-"]
    assert calls == [2, 1] and [r["score"] for r in cell["samples"]] == [1.0, 1.0, 1.0]
    assert cell["metrics"]["accuracy"]["value"] == 1.0 and cell["metrics"]["latency_ms"]["prefill"]["n"] == 2
    assert cell["metrics"]["throughput"]["tokens"] == 12


def test_local_checkpoint_directory_runs(tmp_path: Path) -> None:
    loaded = runner.random_model(seed=3, max_positions=1024)
    ckpt = tmp_path / "ckpt"
    loaded.model.save_pretrained(ckpt)
    loaded.tokenizer.save_pretrained(ckpt)
    summary = _run(tmp_path / "out", TINY.select(policies=("dense",)), model=str(ckpt))
    assert (summary.ran, summary.failed) == (1, 0)
    header, _ = runner.read_results(tmp_path / "out")
    assert header["model"] == str(ckpt) and header["model_random"] is False
    assert header["model_info"]["max_positions"] == 1024


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"unknown tasks \['nope'\]; valid tasks: .*niah_single"):
        _run(tmp_path, TINY.select(tasks=("nope",)))
    with pytest.raises(InvalidInput, match=r"unknown policies \['nope'\]; valid policies: .*quest"):
        TINY.select(policies=("nope",))
    small = runner.random_model(max_positions=300)
    with pytest.raises(InvalidInput, match=r"beyond the model's limit.*max_position_embeddings 300"):
        runner.run(runner.RunConfig(TINY.select(lengths=(512,)), tmp_path / "x"), loader=lambda *_: small, report=False)
    with pytest.raises(NotFound, match="no such file"):
        _run(tmp_path / "y", model=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match=r"no config.json"):
        _run(tmp_path / "y", model=str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"\0")
    with pytest.raises(InvalidInput, match="not a readable directory"):
        _run(tmp_path / "y", model=str(tmp_path / "file.bin"))
    with pytest.raises(InvalidInput, match="batch"):
        runner.RunConfig(TINY, tmp_path, batch=0)
    with pytest.raises(InvalidInput, match="unknown task suite"):
        get_suite("nope")


def test_results_of_another_schema_or_settings_are_refused(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text(json.dumps({"type": "header", "schema": 999, "memfusion": "9.0"}) + "\n")
    with pytest.raises(InvalidInput, match=r"schema 999.*reads schema 1.*fresh --out"):
        _run(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"type": "cell"}\n')
    with pytest.raises(InvalidInput, match="not a memfusion results file"):
        runner.read_results(tmp_path)
    other = tmp_path / "other"
    _run(other, TINY.select(policies=("dense",)))
    with pytest.raises(InvalidInput, match=r"seed=0.*seed=1"):
        _run(other, TINY.select(policies=("dense",)), seed=1)
    with (other / "results.jsonl").open("a") as f:
        f.write('{"type": "cell", "key": "cut sh')  # a killed process: the last line is incomplete
    assert list(runner.read_results(other)[1]) == ["niah_single/dense/256/-"]


def test_suites_are_data_and_quick_is_the_task_suite() -> None:
    smoke = SUITES["smoke"]
    assert len(smoke.cells()) == len(smoke.tasks) * len(smoke.lengths) * (
        sum(len(smoke.budgets) if p in ("window", "quest") else 1 for p in smoke.policies)
    )
    assert task_suite_name("quick") == task_suite_name("tasks-quick") == "tasks-quick"
    assert task_suite_name("full") == "tasks-full" and task_suite_name("kv-quick") is None  # kv-quick = kvperf
    assert max(SUITES["tasks-full"].lengths) == 8192 and min(SUITES["tasks-full"].lengths) == 1024
    with pytest.raises(InvalidInput, match="budgets"):
        Suite("x", "x", ("passkey",), ("dense",), (256,), (1.5,), 1)


def test_cli_smoke_suite_end_to_end_then_resume(tmp_path: Path) -> None:
    cli = CliRunner()
    out = tmp_path / "smoke"
    result = cli.invoke(app, ["bench", "--suite", "smoke", "--model", "random", "--out", str(out)])
    assert result.exit_code == 0, result.output
    n = len(SUITES["smoke"].cells())
    assert f"{n} cells run (0 failed)" in _flat(result.output)
    lines = _lines(out / "results.jsonl")
    assert len(lines) == 1 + n and all(c["status"] == "ok" for c in lines[1:])
    md = (out / "report.md").read_text()
    assert "RANDOM WEIGHTS" in md and "## niah_single" in md and "## kv_lookup" in md
    assert (out / "report.html").stat().st_size > 10_000
    again = cli.invoke(app, ["bench", "--suite", "smoke", "--model", "random", "--out", str(out)])
    assert again.exit_code == 0 and f"0 cells run (0 failed), {n} already finished" in _flat(again.output)
    compared = cli.invoke(app, ["bench", "compare", str(out), str(out / "results.jsonl")])
    assert compared.exit_code == 0 and f"{n} cells compared, 0 significant" in compared.output


def test_cli_bad_input_exits_with_a_message(tmp_path: Path) -> None:
    cli = CliRunner()
    bad = cli.invoke(app, ["bench", "--suite", "smoke", "--tasks", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown tasks" in _flat(bad.output)
    bad = cli.invoke(app, ["bench", "--suite", "smoke", "--model", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "no such file or directory" in _flat(bad.output)
    bad = cli.invoke(app, ["bench", "--suite", "kv-quick", "--model", "random", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "task suites only" in _flat(bad.output)
