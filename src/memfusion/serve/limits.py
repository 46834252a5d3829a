"""Limits of ``memfusion serve``: request size, per-key rate, per-request time.

- :class:`Limits`: the configuration (validated; every field has a CLI flag);
- :class:`TokenBucket` / :class:`RateLimiter`: a token bucket per API key (429 + ``Retry-After``);
- :class:`BodyLimit`: an ASGI middleware that refuses a body over ``max_body_bytes`` (413)
  before the application reads it, whether the client declared a ``Content-Length`` or not;
- :func:`run_bounded`: runs blocking work (a store call, a generation) in a thread pool with
  a deadline (504 when it passes).

A timed-out call's thread is not killed (Python cannot): a store write that was already running
finishes and commits, which is why a 504 means "outcome unknown", never "not written". Work
that has not *started* when its deadline passes is skipped.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memfusion.errors import InvalidInput, MemfusionError

T = TypeVar("T")

MAX_NEW_TOKENS_CAP = 4096
"""The largest ``max_new_tokens`` any server accepts (the schema's bound); ``Limits.max_new_tokens`` <= it."""


class RateLimited(MemfusionError):
    """A key went over its rate; ``retry_after`` seconds until its next token."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(MemfusionError):
    """A request ran past its deadline (HTTP 504); a write may still have been committed."""


def _positive(name: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise InvalidInput(f"{name} must be {what}, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """Server limits. ``rate_per_s`` / ``burst``: the default token bucket of every key (a key
    may override both in the keys file); ``request_timeout_s``: store calls, and receiving a
    body; ``generate_timeout_s``: a generation, queueing included (requests may ask for less
    with ``timeout_s``);
    ``max_new_tokens``: the most tokens one generation may ask for (<= 4096);
    ``store_threads``: threads running store calls; ``max_connections``: concurrent connections
    before uvicorn answers 503."""

    max_body_bytes: int = 1024 * 1024
    rate_per_s: float = 50.0
    burst: int = 100
    request_timeout_s: float = 30.0
    generate_timeout_s: float = 120.0
    max_new_tokens: int = 256
    store_threads: int = 8
    max_connections: int = 128

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "burst", "max_new_tokens", "store_threads", "max_connections"):
            _positive(name, getattr(self, name), integer=True)
        for name in ("rate_per_s", "request_timeout_s", "generate_timeout_s"):
            _positive(name, getattr(self, name))
        if self.max_new_tokens > MAX_NEW_TOKENS_CAP:
            raise InvalidInput(f"max_new_tokens must be at most {MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens}")


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate`` per second; each request takes one.

    Invariant: ``0 <= tokens <= capacity``. Starting full at ``t0``, the requests admitted in
    ``[t0, t]`` number at most ``capacity + rate * (t - t0)``.
    """

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        _positive("rate", rate)
        _positive("capacity", capacity, integer=True)
        self.rate, self.capacity = float(rate), capacity
        self.tokens, self.stamp = float(capacity), now
        self._lock = threading.Lock()

    def take(self, now: float) -> float:
        """Take a token at time ``now``: 0.0 if admitted, else the seconds until one is available."""
        with self._lock:
            if now > self.stamp:
                self.tokens = min(float(self.capacity), self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return 0.0
            return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One :class:`TokenBucket` per key name, made on the key's first request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def check(self, name: str, rate: float, burst: int) -> None:
        """Admit one request of key ``name``, or raise :class:`RateLimited`."""
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = self._buckets[name] = TokenBucket(rate, burst, now)
        wait = bucket.take(now)
        if wait > 0:
            raise RateLimited(f"rate limit of {rate:g} requests/s (burst {burst}) exceeded for this key", wait)


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, 408 for one that does not
    arrive within ``read_timeout_s`` (a client trickling bytes holds no server slot for long).

    A declared ``Content-Length`` over the limit is refused before reading; otherwise the body
    is read (never more than ``max_bytes`` + one message) and handed to the app unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body is over the limit of {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = self.max_bytes + 1
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size, more = 0, True
        deadline = time.monotonic() + self.read_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                detail = f"the request body did not arrive within {self.read_timeout_s:g} s"
                await JSONResponse({"detail": detail}, 408, headers={"Connection": "close"})(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that returns ``messages`` first, then defers to the real one."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def run_bounded(
    executor: Executor, fn: Callable[[], T], timeout_s: float, what: str = "the request", hint: str = ""
) -> T:
    """``fn()`` in ``executor``, awaited for at most ``timeout_s`` seconds (queueing included).

    Raises :class:`RequestTimeout` (its message ends with ``hint``) when the deadline passes;
    ``fn`` is skipped if it has not started by then, and left to finish (its result dropped) if it has."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_s

    def guarded() -> T:
        if time.monotonic() > deadline:
            raise RequestTimeout(f"{what} waited past its {timeout_s:g} s deadline in the queue; it did not run")
        return fn()

    future = loop.run_in_executor(executor, guarded)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except TimeoutError:
        raise RequestTimeout(f"{what} did not finish within its {timeout_s:g} s deadline{hint}") from None
