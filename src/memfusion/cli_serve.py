"""``memfusion serve``: the memory store and the engine over HTTP (see :mod:`memfusion.serve`).

    memfusion serve --store sqlite:///mem.db --keys keys.json --host 127.0.0.1 --port 8700
    memfusion serve hash-key            # a new API key and the key_sha256 to put in the keys file

Exit codes: 0 after a graceful shutdown (SIGTERM / Ctrl-C); 2 bad options, keys file or store
URL (one line on stderr); 1 another memfusion error at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memfusion.cli_store import EMBEDDERS, EmbedderName
from memfusion.errors import InvalidInput, MemfusionError

_SERVER = "Server"
_LIMITS = "Limits"
_ENGINE = "Engine"

serve_app = typer.Typer(
    help=(
        "The memory service over HTTP (FastAPI + uvicorn; OpenAPI at /openapi.json): memories, search, "
        "links, audit, check and the engine's generate, per namespace, behind API keys.\n\n"
        "Keys file (--keys, or $MEMFUSION_API_KEYS inline; JSON, or TOML for a .toml file): "
        '{"keys": [{"name": "alice", "key_sha256": "<hex>", "namespaces": {"alice": "rw", "shared": "r"}}]}; '
        '"*" grants every namespace (and /v1/check). `memfusion serve hash-key` makes a key.'
    ),
    invoke_without_command=True,
    rich_markup_mode="rich",
)


@serve_app.callback()
def serve_command(
    ctx: typer.Context,
    store: Annotated[
        str | None, typer.Option(help="Store URL: sqlite:///mem.db or postgresql://...", rich_help_panel=_SERVER)
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(
            help="API keys file (JSON, or TOML if .toml); default: $MEMFUSION_API_KEYS.", rich_help_panel=_SERVER
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Listen address (no TLS: keep it on loopback).", rich_help_panel=_SERVER)
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(help="Listen port (0: any free port).", rich_help_panel=_SERVER)] = 8700,
    embedder: Annotated[
        EmbedderName,
        typer.Option(
            help="The store's embedder (reopen a store with the one it was built with).", rich_help_panel=_SERVER
        ),
    ] = EmbedderName.MINILM,
    graceful_timeout: Annotated[
        float, typer.Option(help="Seconds in-flight requests get to finish on shutdown.", rich_help_panel=_SERVER)
    ] = 30.0,
    metrics_public: Annotated[
        bool,
        typer.Option(
            "--metrics-public/--metrics-private",
            help="/metrics without a key, or for admin keys only.",
            rich_help_panel=_SERVER,
        ),
    ] = True,
    log_level: Annotated[
        str, typer.Option(help="critical|error|warning|info|debug.", rich_help_panel=_SERVER)
    ] = "info",
    model: Annotated[
        str,
        typer.Option(
            help="'none' (no /v1/generate), 'random', 'reference' or a local checkpoint dir.", rich_help_panel=_ENGINE
        ),
    ] = "none",
    router: Annotated[
        str, typer.Option(help="The engine's router: auto, a strategy or a .toml.", rich_help_panel=_ENGINE)
    ] = ("auto"),
    memory_budget_mb: Annotated[
        float | None, typer.Option(help="The engine's KV memory budget (MB).", rich_help_panel=_ENGINE)
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413 above).", rich_help_panel=_LIMITS)] = (
        1024 * 1024
    ),
    rate: Annotated[
        float,
        typer.Option(
            help="Requests per second per key (429 above; the keys file may override).", rich_help_panel=_LIMITS
        ),
    ] = 50.0,
    burst: Annotated[int, typer.Option(help="Token-bucket size per key.", rich_help_panel=_LIMITS)] = 100,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds per store call (504) and to receive a body (408).", rich_help_panel=_LIMITS)
    ] = (30.0),
    generate_timeout: Annotated[
        float, typer.Option(help="Seconds per generation, queueing included (504).", rich_help_panel=_LIMITS)
    ] = 120.0,
    max_new_tokens: Annotated[
        int, typer.Option(help="Most tokens one generation may ask for.", rich_help_panel=_LIMITS)
    ] = (256),
    store_threads: Annotated[int, typer.Option(help="Threads running store calls.", rich_help_panel=_LIMITS)] = 8,
    max_connections: Annotated[
        int, typer.Option(help="Concurrent connections before 503.", rich_help_panel=_LIMITS)
    ] = 128,
) -> None:
    """Serve the store (and, with --model, the engine) over HTTP until SIGTERM / Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    from memfusion.serve.app import ServeConfig
    from memfusion.serve.auth import KeyRing
    from memfusion.serve.limits import Limits
    from memfusion.serve.run import RunConfig, serve

    if store is None:
        raise typer.BadParameter("give the store URL, e.g. --store sqlite:///mem.db", param_hint="--store")
    try:
        factory = EMBEDDERS[embedder]
        config = ServeConfig(
            store_url=store,
            keys=KeyRing.load(keys),
            limits=Limits(
                max_body_bytes=max_body_bytes,
                rate_per_s=rate,
                burst=burst,
                request_timeout_s=request_timeout,
                generate_timeout_s=generate_timeout,
                max_new_tokens=max_new_tokens,
                store_threads=store_threads,
                max_connections=max_connections,
            ),
            model=model,
            store_options={} if factory is None else {"embedder": factory()},
            router=router,
            memory_budget_mb=memory_budget_mb,
            metrics_public=metrics_public,
        )
        run = RunConfig(host=host, port=port, graceful_timeout_s=graceful_timeout, log_level=log_level)
        serve(config, run)
    except InvalidInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except MemfusionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@serve_app.command("hash-key")
def hash_key_command(
    key: Annotated[
        str | None, typer.Argument(help="Hash this key instead of making a new one ('-': read it from stdin).")
    ] = None,
) -> None:
    """Print a new random API key (give it to the client) and its key_sha256 (put it in the keys file)."""
    import sys

    from memfusion.serve.auth import hash_key, new_key

    if key == "-":
        key = sys.stdin.readline().strip()
    token = key if key is not None else new_key()
    if key is None:
        typer.echo(f"key:        {token}")
    typer.echo(f"key_sha256: {hash_key(token)}")


if __name__ == "__main__":
    serve_app()
