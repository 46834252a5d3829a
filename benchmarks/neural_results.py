"""The reproduced results of the differentiable memories, all on CPU, in one script.

    .venv/bin/python benchmarks/neural_results.py                 # every run, then the report
    .venv/bin/python benchmarks/neural_results.py --dry-run       # print the commands only
    .venv/bin/python benchmarks/neural_results.py --only ntm-copy,lstm-copy

Each run is one ``memfusion train ...`` command (printed before it starts, and in the report) with its
own directory under ``reports/neural-runs/NAME``. Runs go one at a time; the script is resumable: a
run whose ``final.json`` exists is skipped, a run with only a ``checkpoint.pt`` continues with
``--resume``. Then it writes ``reports/neural-results.md`` and ``.json``: a table
``result | ours | target | paper | command`` with the wall time of every run and the machine it ran on.
A target that was not reached is reported as missed, with the figure reached: nothing is tuned here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Run:
    """One ``memfusion train`` invocation: ``name`` is its directory under the runs folder."""

    name: str
    model: str
    task: str
    args: tuple[str, ...] = ()

    def command(self, out: Path) -> list[str]:
        return ["memfusion", "train", self.model, "--task", self.task, *self.args, "--out", str(out)]


RUNS: list[Run] = [
    Run("ntm-copy", "ntm", "copy", ("--steps", "6000", "--seed", "0")),
    Run("lstm-copy", "lstm", "copy", ("--steps", "6000", "--seed", "0")),
    Run("ntm-associative-recall", "ntm", "associative_recall", ("--steps", "6000", "--seed", "0")),
    Run(
        "mann-fewshot-5way",
        "mann",
        "fewshot",
        ("--steps", "6000", "--schedule", "cosine", "-o", "learn_key_strength=true", "--seed", "0"),
    ),
    Run("lstm-fewshot-5way", "lstm", "fewshot", ("--steps", "6000", "--schedule", "cosine", "--seed", "0")),
    Run("dkvmn-synthetic5", "dkvmn", "synthetic5", ("--steps", "1000", "--seed", "0")),
    Run("dkt-synthetic5", "dkt", "synthetic5", ("--steps", "1000", "--seed", "0")),
    Run("hopfield-capacity", "hopfield", "capacity", ("--seed", "0")),
    Run("fusion-passkey", "fusion", "passkey", ("--seed", "0")),
    Run("dnc-traversal", "dnc", "traversal", ("--steps", "6000", "--seed", "0")),
    Run("dnc-shortest-path", "dnc", "shortest_path", ("--steps", "6000", "--seed", "0")),
]

Results = dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table: ``ours`` formats the figures, ``passed`` says whether the target
    was met (None: no target, reported only); ``runs`` are the runs it reads."""

    result: str
    runs: tuple[str, ...]
    ours: Callable[[Results], str]
    target: str
    paper: str
    passed: Callable[[Results], bool] | None = None


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _best(results: Results, run: str, metric: str) -> float:
    """The best value of ``metric`` over a run's evaluations (its ``metrics.jsonl``, kept beside final.json)."""
    return max(float(line[metric]) for line in results[run]["history"])


def _tracing(r: Results) -> str:
    dkvmn, dkt = r["dkvmn-synthetic5"], r["dkt-synthetic5"]
    return (
        f"{_f(dkvmn['auc'])} (DKT {_f(dkt['auc'])}, its best evaluation {_f(_best(r, 'dkt-synthetic5', 'auc'))}; "
        f"best reachable {_f(dkvmn['bayes_auc'])}; oracle {_f(dkvmn['oracle_auc'])})"
    )


def _passkey(m: dict[str, Any]) -> str:
    exact = f"{_f(m['memory_exact_match'])} vs {_f(m['baseline_exact_match'])}"
    return f"{exact} ({_f(m['memory_digit_accuracy'])} vs {_f(m['baseline_digit_accuracy'])})"


ROWS: list[Row] = [
    Row(
        "NTM copy (trained on lengths 1-20): bit errors per sequence at lengths 1-20",
        ("ntm-copy",),
        lambda r: _f(r["ntm-copy"]["bit_errors"]),
        "< 0.05",
        "cost near 0 after ~2e5 sequences (Graves et al. 2014, fig. 3)",
        lambda r: r["ntm-copy"]["bit_errors"] < 0.05,
    ),
    Row(
        "Copy at length 40 (generalisation): bit errors per sequence, NTM vs LSTM",
        ("ntm-copy", "lstm-copy"),
        lambda r: f"NTM {_f(r['ntm-copy']['bit_errors@40'], 2)} vs LSTM {_f(r['lstm-copy']['bit_errors@40'], 2)}",
        "NTM < LSTM",
        "NTM generalises to longer copies, LSTM does not (fig. 4-5)",
        lambda r: r["ntm-copy"]["bit_errors@40"] < r["lstm-copy"]["bit_errors@40"],
    ),
    Row(
        "LSTM copy (baseline, 3 x 256): bit errors per sequence at lengths 1-20",
        ("lstm-copy",),
        lambda r: _f(r["lstm-copy"]["bit_errors"]),
        "(baseline)",
        "LSTM learns copy far slower (fig. 3)",
    ),
    Row(
        "NTM associative recall (2-6 items): bit errors per sequence; at 12 items",
        ("ntm-associative-recall",),
        lambda r: (
            f"{_f(r['ntm-associative-recall']['bit_errors'])}; "
            f"{_f(r['ntm-associative-recall']['bit_errors@12'], 2)} at 12"
        ),
        "solved: < 0.05",
        "cost near 0 after ~1e5 episodes (fig. 10)",
        lambda r: r["ntm-associative-recall"]["bit_errors"] < 0.05,
    ),
    Row(
        "MANN 5-way glyphs: accuracy at instances 1 / 2 / 5 / 10",
        ("mann-fewshot-5way",),
        lambda r: " / ".join(_f(r["mann-fewshot-5way"][f"accuracy_{i}"]) for i in (1, 2, 5, 10)),
        "2nd >= 0.75, 10th >= 0.90",
        "Omniglot: 0.364 / 0.828 / 0.949 / 0.981 (Santoro et al. 2016, table 1)",
        lambda r: r["mann-fewshot-5way"]["accuracy_2"] >= 0.75 and r["mann-fewshot-5way"]["accuracy_10"] >= 0.90,
    ),
    Row(
        "LSTM 5-way glyphs (baseline): accuracy at instances 1 / 2 / 5 / 10",
        ("lstm-fewshot-5way",),
        lambda r: " / ".join(_f(r["lstm-fewshot-5way"][f"accuracy_{i}"]) for i in (1, 2, 5, 10)),
        "(baseline)",
        "Omniglot: 0.244 / 0.495 / 0.636 / 0.625 (table 1)",
    ),
    Row(
        "DKVMN Synthetic-5: test AUC (the DKT baseline; the best reachable: the generator's Bayes posterior "
        "predictive; the oracle: its true probabilities, which need the latent skills)",
        ("dkvmn-synthetic5", "dkt-synthetic5"),
        lambda r: _tracing(r),
        ">= 0.80 and > DKT",
        "0.827 (DKT 0.803) (Zhang et al. 2017, table 2)",
        lambda r: r["dkvmn-synthetic5"]["auc"] >= 0.80 and r["dkvmn-synthetic5"]["auc"] > r["dkt-synthetic5"]["auc"],
    ),
    Row(
        "Hopfield, 1000 stored 128-d ±1 patterns, 20% flipped probes: fraction retrieved, modern vs classical",
        ("hopfield-capacity",),
        lambda r: (
            f"modern {_f(r['hopfield-capacity']['modern@1000'])} vs classical "
            f"{_f(r['hopfield-capacity']['classical@1000'])}"
        ),
        "modern >= 0.99, classical fails",
        "exponential vs ~0.14 D = 18 patterns (Ramsauer et al. 2020)",
        lambda r: r["hopfield-capacity"]["modern@1000"] >= 0.99 and r["hopfield-capacity"]["classical@1000"] < 0.5,
    ),
    Row(
        "Fusion layer, passkey beyond the window: exact match with memory vs without (digit accuracy)",
        ("fusion-passkey",),
        lambda r: _passkey(r["fusion-passkey"]),
        ">= 0.9 with memory, chance (1e-5; digits 0.1) without",
        "kNN memory retrieves beyond the window (Memorizing Transformers)",
        lambda r: (
            r["fusion-passkey"]["memory_exact_match"] >= 0.9 and r["fusion-passkey"]["baseline_digit_accuracy"] < 0.2
        ),
    ),
    Row(
        "DNC traversal (random graphs, 1-4 hops): step accuracy / sequence accuracy",
        ("dnc-traversal",),
        lambda r: f"{_f(r['dnc-traversal']['step_accuracy'])} / {_f(r['dnc-traversal']['seq_accuracy'])}",
        "(reported)",
        "London Underground traversal 0.988 (Graves et al. 2016)",
    ),
    Row(
        "DNC shortest path (random graphs, 1-3 hops): step accuracy / sequence accuracy",
        ("dnc-shortest-path",),
        lambda r: f"{_f(r['dnc-shortest-path']['step_accuracy'])} / {_f(r['dnc-shortest-path']['seq_accuracy'])}",
        "(reported)",
        "London Underground shortest path 0.553 (Graves et al. 2016)",
    ),
]


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _load(out: Path) -> dict[str, Any]:
    """A finished run: its final metrics, with its evaluation lines under ``history``."""
    final = dict(json.loads((out / "final.json").read_text()))
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    final["history"] = [e for e in map(json.loads, lines) if e.get("event") == "eval"]
    return final


def _run(run: Run, runs_dir: Path, dry_run: bool) -> dict[str, Any] | None:
    out = runs_dir / run.name
    shown = run.command(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)
    final = out / "final.json"
    if final.is_file():
        print(f"# done, skipped: {shlex.join(shown)}", flush=True)
        return _load(out)
    resume = (out / "checkpoint.pt").is_file()
    print(shlex.join(shown + (["--resume"] if resume else [])), flush=True)
    if dry_run:
        return None
    argv = [sys.executable, "-m", "memfusion.cli", *run.command(out)[1:], "--json"]
    if resume:
        argv.append("--resume")
    done = subprocess.run(argv, cwd=ROOT, check=False)
    if done.returncode != 0 or not final.is_file():
        print(f"# {run.name} failed (exit {done.returncode}); its row is left out", flush=True)
        return None
    return _load(out)


def _report(results: Results, runs_dir: Path, out: Path) -> None:
    by_name = {r.name: r for r in RUNS}
    rows: list[dict[str, Any]] = []
    for row in ROWS:
        if not all(n in results for n in row.runs):
            continue
        passed = None if row.passed is None else bool(row.passed(results))
        commands = [shlex.join(by_name[n].command(runs_dir.relative_to(ROOT) / n)) for n in row.runs]
        seconds = [float(results[n]["seconds"]) for n in row.runs]
        rows.append(
            {
                "result": row.result,
                "ours": row.ours(results),
                "target": row.target,
                "met": passed,
                "paper": row.paper,
                "commands": commands,
                "wall_seconds": seconds,
            }
        )
    machine = _machine()
    payload = {"machine": machine, "rows": rows, "runs": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Reproduced results: the differentiable memories",
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"torch {machine['torch']}; {machine['date']}. All runs on CPU, one at a time, seed 0, "
        "1 torch thread. Written by `benchmarks/neural_results.py`; per-evaluation lines in "
        f"`{runs_dir.relative_to(ROOT)}/NAME/metrics.jsonl`.",
        "",
        "| result | ours | target | met | paper | wall time | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        wall = " + ".join(f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s" for s in r["wall_seconds"])
        cmds = "<br>".join(f"`{c}`" for c in r["commands"])
        lines.append(f"| {r['result']} | {r['ours']} | {r['target']} | {met} | {r['paper']} | {wall} | {cmds} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2 :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "reports" / "neural-runs")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "neural-results.md")
    parser.add_argument("--only", help="comma-separated run names (default: all): " + ", ".join(r.name for r in RUNS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    runs_dir = args.runs_dir.resolve()
    wanted = set(args.only.split(",")) if args.only else {r.name for r in RUNS}
    unknown = wanted - {r.name for r in RUNS}
    if unknown:
        parser.error(f"unknown run(s) {sorted(unknown)}; valid: {', '.join(r.name for r in RUNS)}")
    results: Results = {}
    for run in RUNS:
        final = runs_dir / run.name / "final.json"
        if run.name in wanted:
            got = _run(run, runs_dir, args.dry_run)
            if got is not None:
                results[run.name] = got
        elif final.is_file():  # finished earlier: still in the report
            results[run.name] = _load(runs_dir / run.name)
    if not args.dry_run:
        _report(results, runs_dir, args.report.resolve())


if __name__ == "__main__":
    main()
