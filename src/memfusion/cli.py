"""The ``memfusion`` command line (typer). Strings become library objects here, once."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from memfusion.cli_store import store_app
from memfusion.errors import MemfusionError

app = typer.Typer(help="memfusion: KV-cache policies, memories and their benchmark.", no_args_is_help=True)
app.add_typer(store_app, name="store")
console = Console()

SUITES: dict[str, dict[str, Any]] = {
    # The quick suite: small contexts, a few minutes on 2 CPU cores at most.
    "quick": dict(contexts=(1024, 2048), new_tokens=16, budget=256, bounded_chunk=32, prefill_chunk=512),
    # The performance table: 4K / 16K / 32K on the 4-layer, 512-wide GQA model.
    "kv": dict(contexts=(4096, 16384, 32768), new_tokens=64, budget=2048, bounded_chunk=64, prefill_chunk=1024),
}


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else None


@app.command()
def bench(
    suite: Annotated[str, typer.Option(help=f"Which suite: {', '.join(SUITES)}.")] = "quick",
    contexts: Annotated[str | None, typer.Option(help="Comma-separated context lengths (overrides the suite).")] = None,
    policies: Annotated[str | None, typer.Option(help="Comma-separated policy names (default: all).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for the report (md, json, png).")] = Path("reports"),
) -> None:
    """Benchmark KV policies against transformers' DynamicCache on one model, in one run."""
    from memfusion.bench import kvperf, report
    from memfusion.kv import POLICIES

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if suite not in SUITES:
        raise typer.BadParameter(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}", param_hint="--suite")
    try:
        available = tuple(p for p in kvperf.KVBenchConfig.policies if p in POLICIES)
        cfg = kvperf.KVBenchConfig(**SUITES[suite], policies=available)
        if contexts:
            cfg = replace(cfg, contexts=tuple(int(c) for c in contexts.split(",")))
        if policies:
            cfg = replace(cfg, policies=_csv(policies) or cfg.policies)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    units = 1 + len(cfg.contexts) * (1 + len(cfg.policies))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("starting", total=units)
        started = [False]

        def step(label: str) -> None:  # called before each unit: the previous one is done
            bar.update(task, description=label, advance=1 if started[0] else 0)
            started[0] = True

        try:
            result = kvperf.run(cfg, progress=step)
        except MemfusionError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        bar.update(task, completed=units, description="done")
    paths = report.write(result, out, f"kv-{suite}")
    console.print("\n".join(report.headline(result)))
    console.print(f"report: {paths['md']} ({paths['json'].name}, {paths['png'].name})")


@app.command()
def info() -> None:
    """Versions, KV policies and supported architectures."""
    import torch
    import transformers

    from memfusion import __version__
    from memfusion.kv import POLICIES, SUPPORTED_ARCHITECTURES

    console.print(f"memfusion {__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    console.print(f"KV policies: {', '.join(POLICIES)}")
    console.print(f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")


if __name__ == "__main__":
    app()
