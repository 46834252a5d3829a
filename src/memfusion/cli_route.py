"""``memfusion route explain`` / ``memfusion route calibrate``: the router from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memfusion.errors import InvalidInput, MemfusionError

route_app = typer.Typer(help="The router: explain a route, calibrate the retrieval threshold.", no_args_is_help=True)
err = Console(stderr=True)


def _fail(exc: MemfusionError) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(2 if isinstance(exc, InvalidInput) else 1)


@route_app.command("explain")
def explain(
    prompt: Annotated[str | None, typer.Argument(help="The prompt ('-' or nothing: read stdin).")] = None,
    file: Annotated[Path | None, typer.Option(help="Read the prompt from this file.")] = None,
    model: Annotated[str, typer.Option(help="reference, random or a local checkpoint path.")] = "reference",
    store: Annotated[str | None, typer.Option(help="Store URL (sqlite:///mem.db, postgresql://...).")] = None,
    namespace: Annotated[str | None, typer.Option(help="Namespace whose memories the request may use.")] = None,
    memory_mb: Annotated[float | None, typer.Option(help="KV memory budget in MB.")] = None,
    latency_ms: Annotated[float | None, typer.Option(help="Latency budget in ms.")] = None,
    table: Annotated[Path | None, typer.Option(help="A router table (TOML) instead of the shipped one.")] = None,
    task: Annotated[str | None, typer.Option(help="Task type (default: estimated from the prompt).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the route as JSON.")] = False,
) -> None:
    """Show the route a prompt would take, and why (the store is searched; nothing is generated)."""
    from memfusion.bench.runner import load_model
    from memfusion.engine import Engine
    from memfusion.store import open_store

    try:
        text = file.read_text() if file is not None else prompt if prompt not in (None, "-") else sys.stdin.read()
        loaded = load_model(model)
        opened = open_store(store) if store is not None else None
        try:
            engine = Engine(
                loaded.model,
                loaded.tokenizer,
                store=opened,
                router=table if table is not None else "auto",
                memory_budget_mb=memory_mb,
                latency_budget_ms=latency_ms,
            )
            route = engine.explain(str(text), namespace, task=task)
        finally:
            if opened is not None:
                opened.close()
    except MemfusionError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        raise _fail(InvalidInput(f"cannot read the prompt: {exc}")) from None
    if json_output:
        typer.echo(json.dumps(route.to_dict(), default=str))
    else:
        Console().print(route.explain(), highlight=False)


@route_app.command("calibrate")
def calibrate(
    out: Annotated[Path, typer.Option(help="Where to write the calibrated table (TOML).")] = Path("router-table.toml"),
    table: Annotated[Path | None, typer.Option(help="The table to calibrate (default: the shipped one).")] = None,
    store: Annotated[
        str | None, typer.Option(help="Store URL to calibrate with (default: a temporary SQLite store).")
    ] = None,
    facts: Annotated[int, typer.Option(help="Facts in the validation namespace.")] = 100,
    questions: Annotated[int, typer.Option(help="Validation questions (half about stored facts).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the validation set.")] = 0,
) -> None:
    """Fit the retrieval threshold and margin on a generated validation set and write the table with them."""
    import tempfile

    from memfusion.engine.calibrate import calibrate as fit
    from memfusion.router import load_table
    from memfusion.store import open_store

    try:
        base = load_table(table)
        with tempfile.TemporaryDirectory() as tmp:
            opened = open_store(store if store is not None else f"sqlite:///{tmp}/calibration.db")
            try:
                cal, mar = fit(opened, "calibration", facts, questions, seed, base.retrieval.k)
            finally:
                opened.close()
        out.write_text(base.with_retrieval(min_score=round(cal.threshold, 4), margin=round(mar.margin, 4)).to_toml())
    except MemfusionError as exc:
        raise _fail(exc) from None
    Console().print(
        f"min_score = {cal.threshold:.4f}: balanced accuracy {cal.balanced_accuracy:.3f} "
        f"(true positives {cal.true_positive_rate:.3f} of {cal.n_positive}, true negatives "
        f"{cal.true_negative_rate:.3f} of {cal.n_negative}); margin = {mar.margin:.4f}: credit "
        f"{mar.credit:.3f}, {mar.mean_kept:.2f} facts kept on average over {mar.n_questions} questions; "
        f"table written to {out}",
        highlight=False,
    )
