"""``memfusion train MODEL --task TASK``: train a differentiable memory (or its baseline) with a recipe.

Strings become library objects here, once: ``MODEL`` and ``--task`` pick a recipe of
:data:`memfusion.bench.recipes.RECIPES`, ``--option KEY=VALUE`` sets the recipe's options, the other
flags override its training defaults. Output: one JSON line per evaluation on stdout (the progress
bar is on stderr and disappears when done), then the final metrics: a table, or with ``--json`` one
JSON line ``{"event": "final", ...}``.

Exit codes: 0 success; 1 training failed (e.g. the loss diverged); 2 bad input (an unknown model,
task or option, a bad value, CUDA asked for but absent, a mismatched checkpoint). Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from memfusion.errors import InvalidInput, MemfusionError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

_RUN = "Run"
_TRAIN = "Training (override the recipe's defaults)"


def _parse_pairs(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--option takes KEY=VALUE (e.g. -o n_way=15), got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _list_recipes() -> None:
    from memfusion.bench.recipes import RECIPES, options_dict

    table = Table(title="memfusion train MODEL --task TASK")
    for name in ("model", "task", "steps", "batch", "lr", "what", "options (-o KEY=VALUE)"):
        table.add_column(name)
    for r in RECIPES.values():
        opts = ", ".join(options_dict(r.options))
        table.add_row(r.model, r.task, str(r.steps), str(r.batch_size), f"{r.lr:g}", r.summary, opts)
    Console().print(table)


def train_command(
    model: Annotated[
        str,
        typer.Argument(
            help="The model: ntm, lstm, dnc, mann, dkvmn, dkt, hopfield, fusion, or reference (the bench's "
            "language model; no --task) ('list' shows every recipe)."
        ),
    ],
    task: Annotated[
        str | None,
        typer.Option("--task", "-t", help="The task (e.g. copy, fewshot, synthetic5).", rich_help_panel=_RUN),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.", rich_help_panel=_TRAIN)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the batches.", rich_help_panel=_RUN)] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", rich_help_panel=_RUN)] = "cpu",
    out: Annotated[
        Path | None,
        typer.Option(help="Run directory: checkpoint.pt, metrics.jsonl, final.json.", rich_help_panel=_RUN),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue from OUT (reference: from its last finished stage).", rich_help_panel=_RUN),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the final metrics as one JSON line.", rich_help_panel=_RUN)
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset path (Omniglot root, ASSISTments CSV) for recipes that read one.", rich_help_panel=_RUN
        ),
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps.", rich_help_panel=_TRAIN)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.", rich_help_panel=_TRAIN)] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.", rich_help_panel=_TRAIN)] = None,
    schedule: Annotated[
        str | None, typer.Option(help="Learning-rate schedule: constant or cosine.", rich_help_panel=_TRAIN)
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="A recipe option KEY=VALUE (repeatable; an unknown key lists the valid ones).",
            rich_help_panel=_RUN,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch threads (default 1: small recurrent models run fastest on it; 2 for reference).",
            rich_help_panel=_RUN,
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar on stderr.", rich_help_panel=_RUN)] = True,
) -> None:
    """Train MODEL on --task with its recipe: a JSON line of metrics per evaluation, checkpoints in --out."""
    from memfusion.bench.recipes import find_recipe, options_dict, run_recipe
    from memfusion.bench.train import Schedule

    err = Console(stderr=True)
    if model == "list":
        _list_recipes()
        return
    if model == "reference":
        _train_reference(steps, seed, out, threads, eval_every, progress, json_output, resume)
        return
    try:
        recipe = find_recipe(model, task)
        pairs = _parse_pairs(option or [])
        if data is not None:
            if "data" not in options_dict(recipe.options):
                raise InvalidInput(f"{recipe.name} reads no dataset: --data is for mann fewshot and dkvmn assistments")
            pairs["data"] = str(data)
        options = recipe.with_options(pairs)
        schedules = {s.value: s for s in Schedule}
        if schedule is not None and schedule not in schedules:
            raise InvalidInput(f"unknown --schedule {schedule!r}; valid: {', '.join(schedules)}")
        config = recipe.config(
            steps=steps,
            seed=seed,
            device=device,
            out=out,
            resume=resume,
            eval_every=eval_every,
            batch_size=batch_size,
            lr=lr,
            schedule=schedules.get(schedule) if schedule is not None else None,
            threads=1 if threads is None else threads,
            progress=progress,
        )
        result = run_recipe(recipe, config, options)
    except InvalidInput as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except MemfusionError as exc:
        err.print(f"[red]training failed:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None
    final = {"event": "final", "model": recipe.model, "task": recipe.task, "seed": seed, **result.metrics}
    if json_output:
        typer.echo(json.dumps(final))
        return
    console = Console()
    console.print(f"{recipe.name}: final metrics", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def _train_reference(
    steps: int | None,
    seed: int,
    out: Path | None,
    threads: int | None,
    eval_every: int | None,
    progress: bool,
    json_output: bool,
    resume: bool = False,
) -> None:
    """``memfusion train reference``: the recipe of :mod:`memfusion.models.reference_train`."""
    from dataclasses import replace

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from memfusion.models.reference_train import TrainConfig, train

    err = Console(stderr=True)
    directory = out if out is not None else Path("reference-model")
    try:
        cfg = TrainConfig(seed=seed)
        cfg = replace(
            cfg if steps is None else cfg.scaled(steps),
            threads=cfg.threads if threads is None else threads,
            eval_every=cfg.eval_every if eval_every is None else eval_every,
        )
    except InvalidInput as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    columns = (TextColumn("reference"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[l]}"))
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not progress) as bar:
        handle = bar.add_task("train", total=cfg.steps, l="-")

        def tick(step: int, metrics: dict[str, float]) -> None:
            bar.update(handle, completed=step, l=f"{metrics['loss']:.3f}")

        def log(row: dict[str, object]) -> None:
            typer.echo(json.dumps({"event": "eval", **row}))

        try:
            record = train(cfg, directory, log=log, progress=tick, resume=resume)
        except InvalidInput as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except RuntimeError as exc:
            err.print(f"[red]training failed:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None
    final = {"event": "final", "model": "reference", "seed": seed, "minutes": record["minutes"], "out": str(directory)}
    final.update({k: v for k, v in record["evaluations"][-1].items() if "@" in k})
    if json_output:
        typer.echo(json.dumps(final))
        return
    Console().print(
        f"reference model written to {directory} in {record['minutes']:.1f} min; "
        f"use it with `memfusion bench --model {directory}`",
        highlight=False,
    )
