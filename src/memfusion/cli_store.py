"""``memfusion store ...``: the persistent, versioned memory store from the command line.

Every command takes the store URL first (``sqlite:///mem.db``, ``postgresql://user@host/db``).
Output is a human-readable table by default and JSON with ``--json`` (one object, or one
object per line for lists; times are ISO 8601 UTC).

Exit codes (documented in ``memfusion store --help``):

- 0: success;
- 1: ``check``/``repair`` found an inconsistency (or another memfusion error);
- 2: bad input (a malformed URL, JSON, time, namespace, ...; also typer's usage errors);
- 3: version conflict (compare-and-set lost); the message names the current version;
- 4: not found.

Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from memfusion.errors import InvalidInput, MemfusionError, NotFound, VersionConflict
from memfusion.store import AuditEntry, ConsistencyReport, Hit, Record, Store, open_store
from memfusion.store.embed import Embedder, HashingEmbedder

EXIT_INCONSISTENT = 1
EXIT_BAD_INPUT = 2
EXIT_CONFLICT = 3
EXIT_NOT_FOUND = 4

store_app = typer.Typer(
    help=(
        "The persistent, versioned memory store: put, get, search, history, audit, check, repair.\n\n"
        "URL is the store, e.g. sqlite:///mem.db. Exit codes: 0 ok, 1 inconsistent store (check/repair), "
        "2 bad input, 3 version conflict (the message names the current version), 4 not found."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
console = Console()


class EmbedderName(enum.StrEnum):
    """The ``--embedder`` choices (a store must be reopened with the embedder it was built with)."""

    MINILM = "minilm"
    HASHING = "hashing"


#: ``--embedder`` -> factory; None means "the store's default" (MiniLM).
EMBEDDERS: dict[EmbedderName, Callable[[], Embedder] | None] = {
    EmbedderName.MINILM: None,
    EmbedderName.HASHING: lambda: HashingEmbedder(256),
}

_STORE = "Store"
_OUT = "Output"
_WRITE = "Write"
_READ = "Read"

UrlArg = Annotated[str, typer.Argument(help="Store URL, e.g. sqlite:///mem.db or postgresql://user@host/db.")]
NamespaceArg = Annotated[str, typer.Argument(help="Namespace (tenant): letters, digits, _ . : @ -.")]
KeyArg = Annotated[str, typer.Argument(help="Record key within the namespace.")]
EmbedderOpt = Annotated[
    EmbedderName,
    typer.Option(
        help="Embedder: 'minilm' (the store's default) or 'hashing' (HashingEmbedder(256), no model). "
        "Reopen a store with the embedder it was created with.",
        rich_help_panel=_STORE,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.", rich_help_panel=_OUT)]
AsOfOpt = Annotated[
    str | None,
    typer.Option(
        help="Time travel: see the store as it was at this ISO 8601 time (naive = UTC).", rich_help_panel=_READ
    ),
]
ExpectedOpt = Annotated[
    int | None,
    typer.Option(
        help="Compare-and-set: write only if the key is at this version (0: must not exist).", rich_help_panel=_WRITE
    ),
]
ActorOpt = Annotated[
    str, typer.Option(help="Who makes the change (recorded in the audit log).", rich_help_panel=_WRITE)
]
ReasonOpt = Annotated[str | None, typer.Option(help="Why (recorded in the audit log).", rich_help_panel=_WRITE)]


# --- parsing (strings become library values here, once) -------------------------------------


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{option} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f'{option} must be a JSON object like \'{{"topic": "x"}}\', got {text!r}')
    return value


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{option} must be an ISO 8601 time like 2025-01-31T12:00:00+00:00, got {text!r}") from exc
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


@contextmanager
def _failures() -> Iterator[None]:
    """Turn memfusion errors into one line on stderr and the documented exit code."""
    try:
        yield
    except VersionConflict as exc:
        typer.echo(f"error: version conflict: {exc} (current version: {exc.current_version})", err=True)
        raise typer.Exit(EXIT_CONFLICT) from exc
    except NotFound as exc:
        typer.echo(f"error: not found: {exc}", err=True)
        raise typer.Exit(EXIT_NOT_FOUND) from exc
    except InvalidInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except MemfusionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@contextmanager
def _opened(url: str, embedder: EmbedderName) -> Iterator[Store]:
    factory = EMBEDDERS[embedder]
    options = {} if factory is None else {"embedder": factory()}
    store = open_store(url, **options)
    try:
        yield store
    finally:
        store.close()


# --- output ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _emit(value: Any) -> None:
    typer.echo(json.dumps(value, default=_plain, ensure_ascii=False))


def _as_dict(item: Record | Hit | AuditEntry) -> dict[str, Any]:
    return dataclasses.asdict(item)


def _iso(t: datetime | None) -> str:
    return "" if t is None else t.isoformat(timespec="seconds")


def _record_table(r: Record) -> Table:
    table = Table("field", "value", title=f"{r.namespace}/{r.key} v{r.version}", show_header=False)
    for name, value in (
        ("text", r.text),
        ("metadata", json.dumps(r.metadata, ensure_ascii=False)),
        ("committed_at", _iso(r.committed_at)),
        ("actor", r.actor),
        ("reason", r.reason or ""),
        ("expires_at", _iso(r.expires_at)),
        ("deleted", str(r.deleted)),
    ):
        table.add_row(name, value)
    return table


def _report(report: ConsistencyReport, as_json: bool) -> None:
    if as_json:
        _emit({"ok": report.ok, **dataclasses.asdict(report)})
        return
    table = Table("check", "result", title="consistency: " + ("ok" if report.ok else "PROBLEMS FOUND"))
    table.add_row("records", str(report.records))
    table.add_row("indexed", str(report.indexed))
    for name in ("missing", "stale", "orphans", "broken_chains", "live_mismatch"):
        table.add_row(
            name, str(len(getattr(report, name))) + (f" {getattr(report, name)[:10]}" if getattr(report, name) else "")
        )
    console.print(table)


# --- commands -------------------------------------------------------------------------------


@store_app.command()
def put(
    url: UrlArg,
    namespace: NamespaceArg,
    key: KeyArg,
    text: Annotated[str, typer.Argument(help="The fact to remember.")],
    meta: Annotated[str | None, typer.Option(help="Metadata as a JSON object.", rich_help_panel=_WRITE)] = None,
    expected_version: ExpectedOpt = None,
    actor: ActorOpt = "memfusion",
    reason: ReasonOpt = None,
    ttl: Annotated[float | None, typer.Option(help="Expire after this many seconds.", rich_help_panel=_WRITE)] = None,
    embedder: EmbedderOpt = EmbedderName.MINILM,
    as_json: JsonOpt = False,
) -> None:
    """Append a new version of KEY (compare-and-set with --expected-version)."""
    with _failures():
        metadata = _json_object(meta, "--meta")
        with _opened(url, embedder) as store:
            record = store.put(
                namespace,
                key,
                text,
                metadata=metadata,
                expected_version=expected_version,
                actor=actor,
                reason=reason,
                ttl=ttl,
            )
    if as_json:
        _emit(_as_dict(record))
    else:
        console.print(f"stored {record.namespace}/{record.key} version {record.version}")


@store_app.command()
def get(
    url: UrlArg,
    namespace: NamespaceArg,
    key: KeyArg,
    as_of: AsOfOpt = None,
    embedder: EmbedderOpt = EmbedderName.MINILM,
    as_json: JsonOpt = False,
) -> None:
    """Show the visible version of KEY (exit 4 if there is none)."""
    with _failures():
        when = _time(as_of, "--as-of")
        with _opened(url, embedder) as store:
            record = store.get(namespace, key, as_of=when)
    if as_json:
        _emit(_as_dict(record))
    else:
        console.print(_record_table(record))


@store_app.command()
def history(
    url: UrlArg,
    namespace: NamespaceArg,
    key: KeyArg,
    embedder: EmbedderOpt = EmbedderName.MINILM,
    as_json: JsonOpt = False,
) -> None:
    """Every version of KEY, oldest first (tombstones and expired versions included)."""
    with _failures(), _opened(url, embedder) as store:
        records = store.history(namespace, key)
    if as_json:
        for r in records:
            _emit(_as_dict(r))
        return
    table = Table("version", "committed_at", "actor", "deleted", "reason", "text", title=f"{namespace}/{key}")
    for r in records:
        table.add_row(str(r.version), _iso(r.committed_at), r.actor, str(r.deleted), r.reason or "", r.text)
    console.print(table)


@store_app.command()
def delete(
    url: UrlArg,
    namespace: NamespaceArg,
    key: KeyArg,
    expected_version: ExpectedOpt = None,
    actor: ActorOpt = "memfusion",
    reason: ReasonOpt = None,
    embedder: EmbedderOpt = EmbedderName.MINILM,
    as_json: JsonOpt = False,
) -> None:
    """Tombstone KEY (its history is kept); exit 4 if it has no live version."""
    with _failures(), _opened(url, embedder) as store:
        record = store.delete(namespace, key, expected_version=expected_version, actor=actor, reason=reason)
    if as_json:
        _emit(_as_dict(record))
    else:
        console.print(f"deleted {record.namespace}/{record.key} (tombstone version {record.version})")


@store_app.command()
def search(
    url: UrlArg,
    namespace: NamespaceArg,
    query: Annotated[str, typer.Argument(help="Text to search for (cosine similarity of embeddings).")],
    k: Annotated[int, typer.Option("-k", "--k", help="How many hits.", rich_help_panel=_READ)] = 5,
    filter: Annotated[
        str | None,
        typer.Option(help='Metadata filter as JSON: {"key": value} or {"key": {"$in": [...]}}.', rich_help_panel=_READ),
    ] = None,
    as_of: AsOfOpt = None,
    embedder: EmbedderOpt = EmbedderName.MINILM,
    as_json: JsonOpt = False,
) -> None:
    """The K visible records most similar to QUERY, best first (JSON: one hit per line)."""
    with _failures():
        flt = _json_object(filter, "--filter")
        when = _time(as_of, "--as-of")
        with _opened(url, embedder) as store:
            hits = store.search(namespace, query, k, filter=flt, as_of=when)
    if as_json:
        for h in hits:
            _emit(_as_dict(h))
        return
    table = Table("rank", "score", "key", "version", "text", title=f"{namespace}: {query}")
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), f"{h.score:.4f}", h.record.key, str(h.record.version), h.record.text)
    console.print(table)


@store_app.command()
def audit(
    url: UrlArg,
    namespace: NamespaceArg,
    since: Annotated[
        str | None,
        typer.Option(help="Only entries committed after this ISO 8601 time (naive = UTC).", rich_help_panel=_READ),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many entries.", rich_help_panel=_READ)] = 1000,
    embedder: EmbedderOpt = EmbedderName.MINILM,
    as_json: JsonOpt = False,
) -> None:
    """The audit log of NAMESPACE, oldest first (JSON: one entry per line)."""
    with _failures():
        after = _time(since, "--since")
        with _opened(url, embedder) as store:
            entries = store.audit(namespace, since=after, limit=limit)
    if as_json:
        for e in entries:
            _emit(_as_dict(e))
        return
    table = Table("seq", "at", "op", "key", "old", "new", "actor", "policy", "reason", title=f"audit: {namespace}")
    for e in entries:
        table.add_row(
            str(e.seq),
            _iso(e.at),
            e.op.value,
            e.key,
            str(e.old_version or ""),
            str(e.new_version or ""),
            e.actor,
            e.policy or "",
            e.reason or "",
        )
    console.print(table)


@store_app.command()
def check(url: UrlArg, embedder: EmbedderOpt = EmbedderName.MINILM, as_json: JsonOpt = False) -> None:
    """Verify index <-> records <-> version chains; exit 1 if anything is inconsistent."""
    with _failures(), _opened(url, embedder) as store:
        report = store.check()
    _report(report, as_json)
    if not report.ok:
        raise typer.Exit(EXIT_INCONSISTENT)


@store_app.command()
def repair(url: UrlArg, embedder: EmbedderOpt = EmbedderName.MINILM, as_json: JsonOpt = False) -> None:
    """Rebuild the index from the records; prints the report after the repair (exit 1 if still not ok)."""
    with _failures(), _opened(url, embedder) as store:
        report = store.repair()
    _report(report, as_json)
    if not report.ok:
        raise typer.Exit(EXIT_INCONSISTENT)
