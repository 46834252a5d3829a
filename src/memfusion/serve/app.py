"""The HTTP API of ``memfusion serve``: :func:`create_app` builds the FastAPI application.

Routes (all under ``/v1`` need an API key: ``Authorization: Bearer <key>`` or ``X-API-Key``)::

    PUT    /v1/namespaces/{ns}/memories/{key}      put (expected_version: compare-and-set)   rw
    GET    /v1/namespaces/{ns}/memories/{key}      get (?as_of=, ?valid_at=)                  r
    DELETE /v1/namespaces/{ns}/memories/{key}      delete (?expected_version=)                rw
    GET    /v1/namespaces/{ns}/history/{key}       every version, oldest first                r
    POST   /v1/namespaces/{ns}/search              search (filter, as_of)                      r
    POST   /v1/namespaces/{ns}/links               link src -[relation]-> dst                  rw
    DELETE /v1/namespaces/{ns}/links               unlink (?src=&relation=&dst=)               rw
    GET    /v1/namespaces/{ns}/neighbors/{node}    edges (?relation=&direction=&as_of=)        r
    GET    /v1/namespaces/{ns}/audit               the audit log (?since=&limit=)              r
    GET    /v1/check                               whole-store consistency                     "*"
    POST   /v1/generate                            the engine (namespace in the body)          r
    GET    /metrics  /healthz  /readyz  /openapi.json                                         open

Keys may contain ``/`` (they are the rest of the path). Order of refusals, outermost first,
from the headers and the path alone: 401 (missing/unknown key), 429 (the key's rate), 403 (no
right on the path's namespace: one body whether or not it exists, so nothing about a foreign
namespace leaks); then 413 / 408 (body size, body too slow); then 422 / 403 (a body's
namespace, ``/v1/generate``) / 404 / 409 / 503 / 504 from the request itself. Errors are
``{"detail": ...}`` (:class:`~memfusion.serve.schemas.ErrorOut`).

Invariants: every store call carries the namespace the caller was authorised for; a write is
acknowledged (2xx) only after the store committed it; generations run one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from memfusion.errors import (
    BudgetExceeded,
    InvalidInput,
    MemfusionError,
    NotFound,
    StoreUnavailable,
    VersionConflict,
)
from memfusion.monitor.metrics import LATENCY_BUCKETS
from memfusion.serve.auth import CALLER, FORBIDDEN, ApiKey, Authenticate, KeyRing
from memfusion.serve.limits import BodyLimit, Limits, RateLimiter, RequestTimeout, run_bounded
from memfusion.serve.schemas import (
    KEY_PATTERN,
    MAX_VERSION,
    NAMESPACE_PATTERN,
    PATTERN_HELP,
    AuditOut,
    CheckOut,
    EdgeOut,
    ErrorOut,
    GenerateBody,
    GenerateOut,
    GenerateStatsOut,
    Health,
    HitOut,
    LinkBody,
    PutBody,
    RecordOut,
    SearchBody,
    Time,
)
from memfusion.store import ConflictPolicy, Store, open_store
from memfusion.store.base import MAX_KEY_CHARS
from memfusion.store.options import MAX_REASON_CHARS

log = logging.getLogger("memfusion.serve")
_CONVERTER = re.compile(r":[a-z]+}")


@dataclass
class ServeConfig:
    """What the server serves. ``model``: ``"none"`` (no ``/v1/generate``), ``"random"``,
    ``"reference"`` or a checkpoint directory; ``store_options`` go to :func:`open_store`
    (e.g. ``embedder``); ``metrics_public``: ``/metrics`` without a key (else an admin key)."""

    store_url: str
    keys: KeyRing
    limits: Limits = field(default_factory=Limits)
    model: str = "none"
    store_options: dict[str, Any] = field(default_factory=dict)
    router: str = "auto"
    memory_budget_mb: float | None = None
    metrics_public: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.store_url, str) or not self.store_url:
            raise InvalidInput("store_url must be a store URL such as sqlite:///mem.db")
        if not isinstance(self.keys, KeyRing):
            raise InvalidInput(f"keys must be a KeyRing (KeyRing.load(path)), got {type(self.keys).__name__}")
        if not isinstance(self.limits, Limits):
            raise InvalidInput(f"limits must be a Limits, got {type(self.limits).__name__}")
        if not isinstance(self.model, str) or not self.model:
            raise InvalidInput("model must be 'none', 'random', 'reference' or a checkpoint directory")
        budget = self.memory_budget_mb
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0
        ):
            raise InvalidInput(f"memory_budget_mb must be a positive number or None, got {self.memory_budget_mb!r}")


def load_engine(config: ServeConfig, store: Store) -> Any:
    """The :class:`~memfusion.engine.Engine` over ``store`` for ``config.model`` (None: ``"none"``)."""
    if config.model == "none":
        return None
    from memfusion.bench.runner import load_model
    from memfusion.engine import Engine

    loaded = load_model(config.model)
    return Engine(
        loaded.model, loaded.tokenizer, store=store, router=config.router, memory_budget_mb=config.memory_budget_mb
    )


class HttpMetrics:
    """Request counters and latency by method, route template (never the raw path: it would
    carry namespace names) and status, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("method", "route", "status")
        self.requests = Counter(
            "memfusion_http_requests_total", "HTTP requests by route and status", labels, registry=self.registry
        )
        self.seconds = Histogram(
            "memfusion_http_request_seconds",
            "HTTP request latency (seconds)",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("memfusion_http_in_flight", "HTTP requests being served", registry=self.registry)


class Service:
    """The running server's state: the store, the engine (None with ``model="none"``), the keys,
    the rate limiter, the two thread pools (store calls; generations, one at a time)."""

    def __init__(self, config: ServeConfig, store: Store | None = None, engine: Any = None) -> None:
        self.config, self.limits = config, config.limits
        self._store, self.engine = store, engine
        self._own_store = store is None
        self.limiter = RateLimiter()
        self.metrics = HttpMetrics()
        self.store_pool: ThreadPoolExecutor | None = None
        self.generate_pool: ThreadPoolExecutor | None = None
        self.ready = False

    @property
    def store(self) -> Store:
        if self._store is None:
            raise StoreUnavailable("the store is not open (the server is starting or stopping)")
        return self._store

    def start(self) -> None:
        if self._store is None:
            self._store = open_store(self.config.store_url, **self.config.store_options)
        if self.engine is None:
            self.engine = load_engine(self.config, self._store)
        self.store_pool = ThreadPoolExecutor(self.limits.store_threads, thread_name_prefix="memfusion-store")
        self.generate_pool = ThreadPoolExecutor(1, thread_name_prefix="memfusion-generate")
        self.ready = True

    def stop(self) -> None:
        """After uvicorn drained the in-flight requests: let running calls finish, then close."""
        self.ready = False
        for pool in (self.store_pool, self.generate_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self._own_store and self._store is not None:
            self._store.close()
            self._store = None

    async def call(self, fn: Callable[[], Any]) -> Any:
        """A store call in the store pool, bounded by ``request_timeout_s``."""
        if self.store_pool is None:
            raise StoreUnavailable("the server is not ready")

        def guarded() -> Any:
            try:
                return fn()
            except OverflowError as exc:  # a number too large for SQL or datetime: the input's fault
                raise InvalidInput(f"a value is out of range: {exc}") from exc

        hint = " (a write may still have been committed: read the key back)"
        return await run_bounded(self.store_pool, guarded, self.limits.request_timeout_s, "the store call", hint)


# --- middleware -------------------------------------------------------------------------------


WRITE_ENDPOINTS = frozenset({"put_memory", "delete_memory", "link", "unlink"})
"""The routes (by endpoint name) under ``/v1/namespaces/{ns}`` that need the ``rw`` right."""


class Measure:
    """Counts every response (401/413/429 from the middleware included) in :class:`HttpMetrics`."""

    def __init__(self, app: ASGIApp, service: Service, routes: Callable[[], list[BaseRoute]]) -> None:
        self.app, self.service, self.routes = app, service, routes

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            for candidate in self.routes():
                match, _ = candidate.matches(scope)
                if match is not Match.NONE:
                    route = candidate
                    break
        return _CONVERTER.sub("}", str(getattr(route, "path", "unmatched")))  # "{key:path}" -> "{key}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        metrics, start = self.service.metrics, time.perf_counter()
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, recording)
        finally:
            metrics.in_flight.dec()
            route, method = self._route(scope), scope["method"]
            metrics.requests.labels(method, route, str(status)).inc()
            metrics.seconds.labels(method, route).observe(time.perf_counter() - start)


# --- errors -----------------------------------------------------------------------------------


class Forbidden(MemfusionError):
    """The caller has no right here (403, always with :data:`FORBIDDEN`)."""


class NoModel(MemfusionError):
    """``/v1/generate`` on a server started with ``--model none`` (503)."""


_STATUS: list[tuple[type[Exception], int]] = [
    (VersionConflict, 409),
    (NotFound, 404),
    (InvalidInput, 422),
    (BudgetExceeded, 422),
    (Forbidden, 403),
    (StoreUnavailable, 503),
    (NoModel, 503),
    (RequestTimeout, 504),
]


async def _memfusion_error(request: Request, exc: Exception) -> Response:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            body: dict[str, Any] = {"detail": FORBIDDEN if status == 403 else str(exc)}
            if isinstance(exc, VersionConflict):
                body["current_version"] = exc.current_version
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse(body, status, headers=headers)
    log.error("unexpected memfusion error", exc_info=exc)
    return JSONResponse({"detail": "internal error"}, 500)


def _message(error: dict[str, Any], json_body: bool) -> str:
    """One validation error in words (pydantic's message, made precise where it is vague)."""
    kind, loc = error["type"], tuple(error.get("loc", ()))
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "JSON decode error")
        return f"the body is not valid JSON: {reason} (at character {loc[-1] if len(loc) > 1 else '?'})"
    if kind == "model_attributes_type" and loc == ("body",) and not json_body:
        return "the body must be a JSON object sent with 'Content-Type: application/json'"
    where = ".".join(str(p) for p in loc)
    if kind == "string_pattern_mismatch":
        pattern = str((error.get("ctx") or {}).get("pattern"))
        return f"{where}: {PATTERN_HELP.get(pattern, error['msg'])}"
    return f"{where}: {error['msg']}"


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    json_body = content_type == "application/json" or content_type.endswith("+json")
    errors = [
        {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]
    detail = "; ".join(_message(e, json_body) for e in exc.errors()) or "invalid request"
    return JSONResponse({"detail": detail, "errors": errors}, 422)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, 500)


# --- dependencies -----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key")


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _caller(request: Request, _b: Annotated[Any, Security(_bearer)], _k: Annotated[Any, Security(_api_key)]) -> ApiKey:
    caller = request.scope.get(CALLER)
    if not isinstance(caller, ApiKey):  # the middleware guarantees it; never serve without
        raise Forbidden(FORBIDDEN)
    return caller


def _access(write: bool) -> Callable[..., ApiKey]:
    """A dependency: the caller, if it may read (or write) the path's namespace; else 403.
    :class:`Authenticate` has already checked the same; this keeps each route safe on its own
    (and marks it in the OpenAPI schema as needing a key)."""

    def dependency(request: Request, caller: Annotated[ApiKey, Depends(_caller)]) -> ApiKey:
        if not caller.may(str(request.path_params.get("ns", "")), write):
            raise Forbidden(FORBIDDEN)
        return caller

    return dependency


Svc = Annotated[Service, Depends(_service)]
Reader = Annotated[ApiKey, Depends(_access(write=False))]
Writer = Annotated[ApiKey, Depends(_access(write=True))]
Ns = Annotated[str, Path(pattern=NAMESPACE_PATTERN, description="The namespace (tenant).")]
KeyPath = Annotated[
    str, Path(min_length=1, max_length=MAX_KEY_CHARS, pattern=KEY_PATTERN, description="The key (may contain '/').")
]
KeyQuery = Annotated[str, Query(min_length=1, max_length=MAX_KEY_CHARS, pattern=KEY_PATTERN)]

_COMMON = (400, 401, 403, 404, 408, 413, 422, 429, 503, 504)
_DESCRIPTIONS = {
    400: "The body is not parseable",
    401: "Missing or unknown API key",
    403: "The key has no right on this namespace (same body whether or not it exists)",
    404: "No such key, edge or namespace (only inside a namespace the key may read)",
    408: "The body did not arrive in time",
    409: "Stale expected_version: current_version carries the key's latest version",
    413: "The body is over the size limit",
    422: "Bad input: detail says what and what is allowed",
    429: "Over the key's rate limit (Retry-After)",
    503: "The store is unavailable, or no model is loaded (Retry-After)",
    504: "Past the deadline; a write may still have been committed",
}


def _errors(*extra: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorOut, "description": _DESCRIPTIONS[s]} for s in sorted({*_COMMON, *extra})}


# --- the application ----------------------------------------------------------------------------


def create_app(config: ServeConfig, *, store: Store | None = None, engine: Any = None) -> FastAPI:
    """The application. ``store`` / ``engine`` given: used as they are (the caller closes them);
    otherwise opened from ``config`` at startup (before the first request is accepted)."""
    service = Service(config, store, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="memfusion",
        summary="The persistent, versioned memory store and the fusion engine over HTTP.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_exception_handler(MemfusionError, _memfusion_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(
        BodyLimit, max_bytes=config.limits.max_body_bytes, read_timeout_s=config.limits.request_timeout_s
    )
    app.add_middleware(
        Authenticate,
        keys=config.keys,
        limiter=service.limiter,
        limits=config.limits,
        routes=lambda: app.routes,
        writes=WRITE_ENDPOINTS,
        protect_metrics=not config.metrics_public,
    )
    app.add_middleware(Measure, service=service, routes=lambda: app.routes)  # outermost
    _memory_routes(app)
    _graph_routes(app)
    _service_routes(app)
    return app


def _version() -> str:
    from memfusion import __version__

    return __version__


def _memory_routes(app: FastAPI) -> None:
    mem = "/v1/namespaces/{ns}/memories/{key:path}"

    @app.put(mem, response_model=RecordOut, responses=_errors(409), tags=["memories"])
    async def put_memory(ns: Ns, key: KeyPath, body: PutBody, caller: Writer, svc: Svc) -> RecordOut:
        """Append a version of ``key`` (compare-and-set with ``expected_version``)."""
        record = await svc.call(
            lambda: svc.store.put(
                ns,
                key,
                body.text,
                metadata=body.metadata,
                expected_version=body.expected_version,
                actor=caller.name,
                reason=body.reason,
                ttl=body.ttl,
                valid_from=body.valid_from,
                valid_to=body.valid_to,
                on_conflict=ConflictPolicy(body.on_conflict),
            )
        )
        return RecordOut.of(record)

    @app.get(mem, response_model=RecordOut, responses=_errors(), tags=["memories"])
    async def get_memory(
        ns: Ns, key: KeyPath, _: Reader, svc: Svc, as_of: Time | None = None, valid_at: Time | None = None
    ) -> RecordOut:
        """The visible version of ``key`` (``as_of``: as the store was then)."""
        return RecordOut.of(await svc.call(lambda: svc.store.get(ns, key, as_of=as_of, valid_at=valid_at)))

    @app.delete(mem, response_model=RecordOut, responses=_errors(409), tags=["memories"])
    async def delete_memory(
        ns: Ns,
        key: KeyPath,
        caller: Writer,
        svc: Svc,
        expected_version: Annotated[int | None, Query(ge=0, le=MAX_VERSION)] = None,
        reason: Annotated[str | None, Query(max_length=MAX_REASON_CHARS)] = None,
    ) -> RecordOut:
        """Tombstone ``key`` (its history is kept); returns the tombstone version."""
        record = await svc.call(
            lambda: svc.store.delete(ns, key, expected_version=expected_version, actor=caller.name, reason=reason)
        )
        return RecordOut.of(record)

    @app.get(
        "/v1/namespaces/{ns}/history/{key:path}", response_model=list[RecordOut], responses=_errors(), tags=["memories"]
    )
    async def history(ns: Ns, key: KeyPath, _: Reader, svc: Svc) -> list[RecordOut]:
        """Every version of ``key``, oldest first (tombstones and expired versions included)."""
        return [RecordOut.of(r) for r in await svc.call(lambda: svc.store.history(ns, key))]

    @app.post("/v1/namespaces/{ns}/search", response_model=list[HitOut], responses=_errors(), tags=["memories"])
    async def search(ns: Ns, body: SearchBody, _: Reader, svc: Svc) -> list[HitOut]:
        """The ``k`` visible records most similar to ``query``, best first."""
        hits = await svc.call(
            lambda: svc.store.search(
                ns, body.query, body.k, filter=body.store_filter(), as_of=body.as_of, valid_at=body.valid_at
            )
        )
        return [HitOut.of(h) for h in hits]

    @app.get("/v1/namespaces/{ns}/audit", response_model=list[AuditOut], responses=_errors(), tags=["memories"])
    async def audit(
        ns: Ns,
        _: Reader,
        svc: Svc,
        since: Time | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> list[AuditOut]:
        """Audit entries of the namespace committed after ``since``, oldest first."""
        return [AuditOut.of(a) for a in await svc.call(lambda: svc.store.audit(ns, since=since, limit=limit))]


def _graph_routes(app: FastAPI) -> None:
    links = "/v1/namespaces/{ns}/links"

    @app.post(links, response_model=EdgeOut, responses=_errors(), tags=["graph"])
    async def link(ns: Ns, body: LinkBody, caller: Writer, svc: Svc) -> EdgeOut:
        """Add (a new version of) the edge ``src -[relation]-> dst``."""
        edge = await svc.call(
            lambda: svc.store.link(
                ns,
                body.src,
                body.relation,
                body.dst,
                metadata=body.metadata,
                valid_from=body.valid_from,
                valid_to=body.valid_to,
                actor=caller.name,
            )
        )
        return EdgeOut.of(edge)

    @app.delete(links, response_model=EdgeOut, responses=_errors(), tags=["graph"])
    async def unlink(ns: Ns, src: KeyQuery, relation: KeyQuery, dst: KeyQuery, caller: Writer, svc: Svc) -> EdgeOut:
        """Tombstone the edge (404 if it is not live)."""
        return EdgeOut.of(await svc.call(lambda: svc.store.unlink(ns, src, relation, dst, actor=caller.name)))

    @app.get(
        "/v1/namespaces/{ns}/neighbors/{node:path}", response_model=list[EdgeOut], responses=_errors(), tags=["graph"]
    )
    async def neighbors(
        ns: Ns,
        node: KeyPath,
        _: Reader,
        svc: Svc,
        relation: Annotated[str | None, Query(min_length=1, max_length=MAX_KEY_CHARS, pattern=KEY_PATTERN)] = None,
        direction: Literal["out", "in", "both"] = "out",
        as_of: Time | None = None,
        valid_at: Time | None = None,
    ) -> list[EdgeOut]:
        """Live edges from (``out``), to (``in``) or around (``both``) ``node``."""
        edges = await svc.call(
            lambda: svc.store.neighbors(
                ns, node, relation=relation, direction=direction, as_of=as_of, valid_at=valid_at
            )
        )
        return [EdgeOut.of(e) for e in edges]


def _service_routes(app: FastAPI) -> None:
    @app.get("/v1/check", response_model=CheckOut, responses=_errors(), tags=["service"])
    async def check(caller: Annotated[ApiKey, Depends(_caller)], svc: Svc) -> CheckOut:
        """Verify index <-> records <-> version chains of the whole store (admin keys: ``"*"``)."""
        if not caller.admin:
            raise Forbidden(FORBIDDEN)
        return CheckOut.of(await svc.call(lambda: svc.store.check()))

    @app.post("/v1/generate", response_model=GenerateOut, responses=_errors(), tags=["engine"])
    async def generate(body: GenerateBody, caller: Annotated[ApiKey, Depends(_caller)], svc: Svc) -> GenerateOut:
        """The engine's ``generate`` with the namespace's memories: text, route and stats.
        Generations run one at a time; ``timeout_s`` (or the server's limit) covers the wait."""
        if body.namespace is not None and not caller.may(body.namespace, write=False):
            raise Forbidden(FORBIDDEN)
        engine = svc.engine
        if engine is None:
            raise NoModel(
                "this server runs without a model (--model none); start it with --model random|reference|PATH"
            )
        limits = svc.limits
        if body.max_new_tokens > limits.max_new_tokens:
            raise InvalidInput(
                f"max_new_tokens is {body.max_new_tokens}; this server allows at most {limits.max_new_tokens}"
            )
        timeout = min(body.timeout_s or limits.generate_timeout_s, limits.generate_timeout_s)
        assert svc.generate_pool is not None

        def run() -> Any:
            try:
                return engine.generate(
                    body.prompt, body.namespace, max_new_tokens=body.max_new_tokens, as_of=body.as_of, task=body.task
                )
            except OverflowError as exc:
                raise InvalidInput(f"a value is out of range: {exc}") from exc

        out = await run_bounded(svc.generate_pool, run, timeout, "the generation")
        stats = out.stats
        return GenerateOut(
            text=out.text,
            tokens=out.tokens,
            route=out.route.to_dict(),
            stats=GenerateStatsOut(
                prompt_tokens=stats.prompt_tokens,
                new_tokens=stats.new_tokens,
                latency=stats.latency,
                retrieved=[HitOut.of(h) for h in stats.retrieved],
                best_score=stats.best_score,
                within_budget=stats.within_budget,
                kv=None if stats.kv is None else _kv(stats.kv),
            ),
            prompt=out.prompt,
        )

    @app.get("/metrics", tags=["service"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics(svc: Svc) -> Response:
        """Prometheus text: the HTTP requests, and the engine's monitor when a model is loaded."""
        body = generate_latest(svc.metrics.registry)
        if svc.engine is not None:
            body = svc.engine.monitor.exposition() + body
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        """The process is up and serving HTTP."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["service"])
    async def readyz(svc: Svc) -> Response:
        """The store is open (and the model loaded): requests will be served."""
        ready = svc.ready
        return JSONResponse({"status": "ready" if ready else "starting"}, 200 if ready else 503)


def _kv(kv: Any) -> dict[str, Any]:
    import dataclasses

    out: dict[str, Any] = dataclasses.asdict(kv)
    return out
