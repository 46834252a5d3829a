"""The ``memfusion`` command line (typer). Strings become library objects here, once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from memfusion.cli_route import route_app
from memfusion.cli_serve import serve_app
from memfusion.cli_store import store_app
from memfusion.cli_train import train_command
from memfusion.errors import MemfusionError

app = typer.Typer(help="memfusion: KV-cache policies, memories and their benchmark.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(route_app, name="route")
app.add_typer(serve_app, name="serve")
app.command("train")(train_command)
console = Console()

SUITES: dict[str, dict[str, Any]] = {
    # The quick suite: small contexts, a few minutes on 2 CPU cores at most.
    "kv-quick": dict(contexts=(1024, 2048), new_tokens=16, budget=256, bounded_chunk=32, prefill_chunk=512),
    # The performance table: 4K / 16K / 32K on the 4-layer, 512-wide GQA model.
    "kv": dict(contexts=(4096, 16384, 32768), new_tokens=64, budget=2048, bounded_chunk=64, prefill_chunk=1024),
}


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else None


bench_app = typer.Typer(
    help="Benchmarks: KV performance (suites quick, kv) and tasks x policies x lengths (smoke, tasks-quick, "
    "tasks-full); `bench compare A B` diffs two task result sets.",
    invoke_without_command=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    suite: Annotated[
        str,
        typer.Option(
            help=f"Which suite: quick / full (task suites on the reference model), {', '.join(SUITES)} "
            "(KV performance), smoke, tasks-quick, tasks-full, fusion, fusion-quick."
        ),
    ] = "quick",
    contexts: Annotated[str | None, typer.Option(help="Comma-separated context lengths (overrides the suite).")] = None,
    policies: Annotated[
        str | None, typer.Option(help="Comma-separated policy names (default: all); fusion: route specs.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the report (default: reports, or reports/SUITE for tasks).")
    ] = None,
    lengths: Annotated[str | None, typer.Option(help="Task suites: comma-separated prompt lengths.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Task suites: comma-separated task names.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Task suites: 'reference' (default), 'random' or a local checkpoint dir.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Task suites: cpu (default) or cuda[:N].")] = None,
    batch: Annotated[int | None, typer.Option(help="Task suites: requests decoded together (default 1).")] = None,
    seed: Annotated[int | None, typer.Option(help="Task suites: seed of the samples and the random model.")] = None,
) -> None:
    """KV performance suites (quick, kv): KV policies against transformers' DynamicCache on one model.
    Task suites (smoke, tasks-quick, tasks-full): accuracy / KV memory / latency per task x policy x length.
    Fusion suites (fusion, fusion-quick): the engine's routes (auto vs fixed strategies, --policies takes
    route specs such as window+store) on accuracy, KV memory and latency, with the Pareto front."""
    if ctx.invoked_subcommand is not None:
        return
    from memfusion.bench.suites import task_suite_name

    if suite in FUSION_SUITES:
        if tasks is not None or device is not None or batch is not None:
            raise typer.BadParameter("--tasks, --device and --batch do not apply to the fusion suites")
        _bench_fusion(suite, policies, lengths or contexts, out, model, seed)
        return
    if task_suite_name(suite) is not None:
        _bench_tasks(
            suite, policies, lengths or contexts, out, tasks=tasks, model=model, device=device, batch=batch, seed=seed
        )
        return
    task_options = {"tasks": tasks, "model": model, "device": device, "batch": batch, "seed": seed}
    given = [f"--{k}" for k, v in task_options.items() if v is not None]
    if given:
        raise typer.BadParameter(f"{', '.join(given)} apply to the task suites only, not to --suite {suite}")
    _bench_kv(suite, contexts or lengths, policies, out or Path("reports"))


def _bench_kv(suite: str, contexts: str | None, policies: str | None, out: Path) -> None:
    """The KV performance benchmark (kvperf)."""
    from memfusion.bench import kvperf, report
    from memfusion.kv import POLICIES

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if suite not in SUITES:
        from memfusion.bench.suites import SUITES as TASK_SUITES

        valid = ", ".join([*SUITES, *TASK_SUITES])
        raise typer.BadParameter(f"unknown suite {suite!r}; valid: {valid}", param_hint="--suite")
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
    paths = report.write(result, out, suite if suite.startswith("kv-") else f"kv-{suite}")
    console.print("\n".join(report.headline(result)))
    console.print(f"report: {paths['md']} ({paths['json'].name}, {paths['png'].name})")


@contextmanager
def _cell_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar with the current cell; yields the ``step(label, done, total)`` callback."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("loading the model", total=None)

        def step(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        yield step


FUSION_SUITES = ("fusion", "fusion-quick")


def _bench_fusion(
    suite: str, routes: str | None, lengths: str | None, out: Path | None, model: str | None, seed: int | None
) -> None:
    """The fusion suite (memfusion.bench.fusion): routes compared on accuracy, KV memory, latency."""
    from memfusion.bench import fusion

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides: dict[str, Any] = {"out": out or Path("reports") / suite, "model": model or "reference"}
    if routes is not None:
        overrides["routes"] = _csv(routes)
    if lengths is not None:
        overrides["lengths"] = tuple(int(n) for n in _csv(lengths) or ())
    if seed is not None:
        overrides["seed"] = seed
    try:
        cfg = fusion.FusionConfig.quick(**overrides) if suite == "fusion-quick" else fusion.FusionConfig(**overrides)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    with _cell_progress() as step:
        try:
            res = fusion.run(cfg, step=step)
        except MemfusionError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    console.print(f"{res.ran} samples run ({res.failed} failed), {res.skipped} already finished: {res.path}")
    if res.report:
        console.print(f"report: {res.report['md']} and {res.report['html'].name}")
    if res.interrupted:
        console.print("[yellow]interrupted:[/yellow] the report covers the finished samples; re-run to resume")
        raise typer.Exit(130)


def _bench_tasks(
    suite: str,
    policies: str | None,
    lengths: str | None,
    out: Path | None,
    *,
    tasks: str | None,
    model: str | None,
    device: str | None,
    batch: int | None,
    seed: int | None,
) -> None:
    """A task suite on a model (memfusion.bench.runner): results.jsonl, report.md, report.html."""
    from memfusion.bench import runner
    from memfusion.bench.suites import get_suite

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        chosen = get_suite(suite).select(
            tasks=_csv(tasks),
            policies=_csv(policies),
            lengths=tuple(int(n) for n in _csv(lengths) or ()) or None,
        )
        cfg = runner.RunConfig(
            suite=chosen,
            out=out or Path("reports") / chosen.name,
            model=model or "reference",
            device=device or "cpu",
            batch=1 if batch is None else batch,
            seed=0 if seed is None else seed,
        )
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    with _cell_progress() as step:
        try:
            summary = runner.run(cfg, progress=step)
        except MemfusionError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    console.print(
        f"{summary.ran} cells run ({summary.failed} failed), {summary.skipped} already finished: {summary.path}"
    )
    if summary.report:
        console.print(f"report: {summary.report['md']} and {summary.report['html'].name}")
    if summary.interrupted:
        console.print("[yellow]interrupted:[/yellow] the report covers the finished cells; re-run to resume")
        raise typer.Exit(130)


@bench_app.command("compare")
def bench_compare(
    a: Annotated[Path, typer.Argument(help="Result set A: a directory with results.jsonl, or the file.")],
    b: Annotated[Path, typer.Argument(help="Result set B.")],
) -> None:
    """Differences B - A of two task result sets: accuracy (with significance), KV MB, decode latency."""
    from memfusion.bench import compare

    try:
        text = compare.render(compare.compare(a, b))
    except MemfusionError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    print(text)


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
