"""``memfusion train ...`` driven through typer's CliRunner: short runs, resume, errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from memfusion.cli import app
from memfusion.cli_train import EXIT_BAD_INPUT

runner = CliRunner()

TINY_NTM = ["-o", "hidden_size=8", "-o", "memory_slots=8", "-o", "memory_width=4", "-o", "max_length=3"]
TINY_NTM += ["-o", "eval_lengths=5", "-o", "eval_size=8"]


def run(*args: str) -> Result:
    return runner.invoke(app, ["train", *args, "--no-progress"])


def lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def without_time(line: dict[str, Any]) -> dict[str, Any]:
    """The line without its wall time and planned number of steps (they differ between the runs compared)."""
    return {k: v for k, v in line.items() if k not in ("seconds", "steps")}


def test_ntm_copy_five_steps_json() -> None:
    out = lines(
        run("ntm", "--task", "copy", "--steps", "5", "--eval-every", "2", "--batch-size", "4", *TINY_NTM, "--json")
    )
    evals, final = out[:-1], out[-1]
    assert [e["step"] for e in evals] == [2, 4, 5] and all(e["event"] == "eval" for e in evals)
    assert final["event"] == "final" and (final["model"], final["task"], final["step"]) == ("ntm", "copy", 5)
    assert final["bit_errors"] == evals[-1]["bit_errors"] and 0 <= final["seq_accuracy@5"] <= 1
    assert {"bit_errors", "seq_accuracy", "bit_errors@5", "train_loss"} <= set(final)


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    args = ("lstm", "-t", "copy", "--steps", "3", "--batch-size", "4", *TINY_NTM, "--json")
    a, b = lines(run(*args, "--seed", "1"))[-1], lines(run(*args, "--seed", "1"))[-1]
    c = lines(run(*args, "--seed", "2"))[-1]
    assert without_time(a) == without_time(b)
    assert a["train_loss"] != c["train_loss"]


def test_hopfield_capacity_is_evaluation_only() -> None:
    out = lines(
        run("hopfield", "--task", "capacity", "-o", "dim=16", "-o", "counts=2,40", "-o", "memories=2", "--json")
    )
    assert len(out) == 2 and out[-1]["step"] == 0
    assert set(out[-1]) >= {"modern@2", "modern@40", "classical@2", "classical@40"}
    bad = run("hopfield", "--task", "capacity", "-o", "dim=16", "--steps", "3")
    assert bad.exit_code == EXIT_BAD_INPUT and "no parameters" in bad.output


def test_checkpoint_and_resume_continue_the_run(tmp_path: Path) -> None:
    common = ("dkt", "--task", "synthetic5", "-o", "students=30", "-o", "hidden_size=8", "--batch-size", "4")
    full = lines(run(*common, "--steps", "6", "--eval-every", "3", "--json"))
    first = lines(run(*common, "--steps", "3", "--eval-every", "3", "--out", str(tmp_path), "--json"))
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "final.json").is_file()
    assert without_time(first[0]) == without_time(full[0])
    again = run(*common, "--steps", "6", "--out", str(tmp_path))  # not resuming over a checkpoint
    assert again.exit_code == EXIT_BAD_INPUT and "--resume" in again.output
    resumed = lines(run(*common, "--steps", "6", "--eval-every", "3", "--out", str(tmp_path), "--resume", "--json"))
    assert without_time(resumed[0]) == without_time(full[1])
    assert without_time(resumed[-1]) == without_time(full[-1])
    mismatch = run(*common, "--steps", "6", "--lr", "0.5", "--out", str(tmp_path), "--resume")
    assert mismatch.exit_code == EXIT_BAD_INPUT and "another run" in mismatch.output


def test_train_reference_stops_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`memfusion train reference` on a tiny recipe: a stopped run (its first stages) resumed to the
    end gives the weights of the run done in one go; over a checkpoint it needs --resume."""
    from functools import partial

    from memfusion.models import reference_train
    from memfusion.models.reference import ReferenceArch, load

    tiny = ReferenceArch(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, max_position=1024)
    stages = (reference_train.Stage(128, 2, 2, "warm"), reference_train.Stage(128, 2, 2, "noise"))

    def recipe(n: int) -> None:
        config = partial(reference_train.TrainConfig, arch=tiny, stages=stages[:n], eval_lengths=(300,), eval_samples=1)
        monkeypatch.setattr(reference_train, "TrainConfig", config)

    common = ("reference", "--threads", "1", "--json")
    recipe(2)
    whole = lines(run(*common, "--out", str(tmp_path / "one")))
    assert whole[-1]["event"] == "final" and [e["stage"] for e in whole[:-1]] == [0, 1]
    recipe(1)
    lines(run(*common, "--out", str(tmp_path / "two")))
    recipe(2)
    again = run(*common, "--out", str(tmp_path / "two"))
    assert again.exit_code == EXIT_BAD_INPUT and "--resume" in again.output
    resumed = lines(run(*common, "--out", str(tmp_path / "two"), "--resume"))
    assert [e["stage"] for e in resumed[:-1]] == [1]
    one, two = load(tmp_path / "one")[0].state_dict(), load(tmp_path / "two")[0].state_dict()
    assert all(torch.equal(one[name], two[name]) for name in one)
    other = run(*common, "--out", str(tmp_path / "two"), "--resume", "--seed", "3")
    assert other.exit_code == EXIT_BAD_INPUT and "seed differ" in other.output


def test_table_output_without_json() -> None:
    result = run("dkt", "-t", "synthetic5", "-o", "students=30", "-o", "hidden_size=8", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "dkt synthetic5: final metrics" in result.stdout and "oracle_auc" in result.stdout
    assert '"event": "final"' not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodel", "--task", "lm"], "unknown model 'nosuchmodel'"),
        (["mann"], "valid tasks for mann: fewshot"),
        (["dkvmn", "--task", "copy"], "no recipe trains dkvmn on 'copy'"),
        (["ntm", "--task", "copy", "-o", "bogus=1"], "unknown option(s) bogus"),
        (["ntm", "--task", "copy", "-o", "hidden_size"], "KEY=VALUE"),
        (["ntm", "--task", "copy", "-o", "hidden_size=x"], "must be an integer"),
        (["ntm", "--task", "copy", "--data", "/tmp/x"], "reads no dataset"),
        (["ntm", "--task", "copy", "--steps", "-1"], "steps must be an integer >= 0"),
        (["ntm", "--task", "copy", "--lr", "0"], "lr must be"),
        (["ntm", "--task", "copy", "--schedule", "linear"], "valid: constant, cosine"),
        (["ntm", "--task", "copy", "--device", "tpu"], "unknown device"),
        (["ntm", "--task", "copy", "--resume"], "resume needs out"),
        (["dkvmn", "--task", "assistments"], "--data PATH"),
        (["mann", "--task", "fewshot", "--data", "/nonexistent/omniglot", "--steps", "1"], "does not exist"),
        (["fusion", "--task", "passkey", "--resume", "--out", "/tmp/x"], "without --resume"),
    ],
)
def test_bad_input_exits_2_with_a_message(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_list_shows_every_recipe() -> None:
    result = runner.invoke(app, ["train", "list"], terminal_width=400)
    assert result.exit_code == 0, result.output
    for model, task in (("ntm", "copy"), ("mann", "fewshot"), ("dkvmn", "synthetic5"), ("fusion", "passkey")):
        assert any(model in line and task in line for line in result.stdout.splitlines()), (model, task)


def test_unknown_model_lists_every_model() -> None:
    result = run("nosuchmodel")
    assert result.exit_code == EXIT_BAD_INPUT
    for name in ("ntm", "lstm", "dnc", "mann", "dkvmn", "dkt", "hopfield", "fusion"):
        assert name in result.output


def test_cuda_asked_for_but_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run("ntm", "--task", "copy", "--device", "cuda", "--steps", "1")
    assert result.exit_code == EXIT_BAD_INPUT and "CUDA is not available" in result.output
