"""API keys of ``memfusion serve``: who may read or write which namespace, and the middleware
that enforces it (:class:`Authenticate`).

A key is a random token (``mf_`` + 43 URL-safe characters, 256 bits) that only its holder
knows; the server keeps its SHA-256 (hex) and compares digests with
:func:`hmac.compare_digest`. The keys file (``--keys FILE``) is JSON or TOML (by suffix; the
``MEMFUSION_API_KEYS`` environment variable holds the same content inline, JSON or TOML)::

    {"keys": [
      {"name": "alice-agent", "key_sha256": "<64 hex>", "namespaces": {"alice": "rw", "shared": "r"}},
      {"name": "ops", "key_sha256": "<64 hex>", "namespaces": {"*": "rw"}, "rate_per_s": 500, "burst": 1000}
    ]}

Invariants (checked when the ring is built, :class:`~memfusion.errors.InvalidInput` otherwise):
names and digests are unique; a digest is 64 lower-case hex digits; a namespace is a valid store
namespace or ``"*"`` (every namespace: the admin wildcard, which alone may run ``/v1/check``);
a right is ``"r"`` (read) or ``"rw"`` (read and write). A key's right on a namespace is the
strongest of its exact entry and its ``"*"`` entry; no entry means no access at all.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from memfusion.errors import InvalidInput
from memfusion.serve.limits import Limits, RateLimited, RateLimiter
from memfusion.store.base import check_key, check_namespace

WILDCARD = "*"
CALLER = "memfusion.api_key"
"""The ASGI scope entry where :class:`Authenticate` leaves the caller's :class:`ApiKey`."""
UNAUTHORIZED = "missing or unknown API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
FORBIDDEN = "this API key has no right to this operation on the requested namespace"
"""The one 403 body: the same whatever the namespace, existing or not."""
ENV_VAR = "MEMFUSION_API_KEYS"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"name", "key_sha256", "namespaces", "rate_per_s", "burst"}


class Right(enum.Enum):
    """What a key may do in a namespace; ``READ_WRITE`` includes ``READ``."""

    READ = "r"
    READ_WRITE = "rw"

    def allows(self, write: bool) -> bool:
        return self is Right.READ_WRITE or not write


def new_key() -> str:
    """A fresh random API key (256 bits from :mod:`secrets`)."""
    return "mf_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest the keys file stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One entry of the keys file. ``rate_per_s`` / ``burst`` (None: the server's defaults)
    override the per-key token bucket of :class:`memfusion.serve.limits.RateLimiter`."""

    name: str
    key_sha256: str
    namespaces: Mapping[str, Right] = field(default_factory=dict)
    rate_per_s: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        check_key(self.name, "API key name")
        if not isinstance(self.key_sha256, str) or not _DIGEST.match(self.key_sha256):
            raise InvalidInput(
                f"API key {self.name!r}: key_sha256 must be 64 lower-case hex digits (the SHA-256 of the key; "
                "`memfusion serve hash-key` prints one)"
            )
        for ns, right in self.namespaces.items():
            if ns != WILDCARD:
                check_namespace(ns)
            if not isinstance(right, Right):
                raise InvalidInput(f"API key {self.name!r}: the right on {ns!r} must be a Right, got {right!r}")
        if self.rate_per_s is not None and (
            isinstance(self.rate_per_s, bool)
            or not isinstance(self.rate_per_s, int | float)
            or not math.isfinite(self.rate_per_s)
            or self.rate_per_s <= 0
        ):
            raise InvalidInput(f"API key {self.name!r}: rate_per_s must be a positive number, got {self.rate_per_s!r}")
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise InvalidInput(f"API key {self.name!r}: burst must be a positive integer, got {self.burst!r}")

    @property
    def admin(self) -> bool:
        """Holds the ``"*"`` wildcard (may run whole-store operations such as ``check``)."""
        return WILDCARD in self.namespaces

    def right(self, namespace: str) -> Right | None:
        """The strongest right of the exact entry and the wildcard; None: no access."""
        rights = [r for r in (self.namespaces.get(namespace), self.namespaces.get(WILDCARD)) if r is not None]
        if not rights:
            return None
        return Right.READ_WRITE if Right.READ_WRITE in rights else Right.READ

    def may(self, namespace: str, write: bool) -> bool:
        right = self.right(namespace)
        return right is not None and right.allows(write)


def _entry(raw: Any, index: int) -> ApiKey:
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"keys[{index}] must be an object with name, key_sha256 and namespaces")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise InvalidInput(f"keys[{index}]: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    for required in ("name", "key_sha256", "namespaces"):
        if required not in raw:
            raise InvalidInput(f"keys[{index}]: the field {required!r} is missing")
    namespaces = raw["namespaces"]
    if not isinstance(namespaces, Mapping):
        raise InvalidInput(f'keys[{index}].namespaces must be an object like {{"alice": "rw", "shared": "r"}}')
    rights: dict[str, Right] = {}
    for ns, right in namespaces.items():
        try:
            rights[ns] = Right(right)
        except ValueError:
            raise InvalidInput(
                f"keys[{index}].namespaces[{ns!r}] must be 'r' (read) or 'rw' (read and write), got {right!r}"
            ) from None
    return ApiKey(
        name=raw["name"],
        key_sha256=raw["key_sha256"],
        namespaces=rights,
        rate_per_s=raw.get("rate_per_s"),
        burst=raw.get("burst"),
    )


class KeyRing:
    """The server's API keys (see the module docstring for the invariants)."""

    def __init__(self, keys: list[ApiKey]) -> None:
        if not keys:
            raise InvalidInput("the keys file lists no API key: add one (`memfusion serve hash-key` makes one)")
        names = [k.name for k in keys]
        digests = [k.key_sha256 for k in keys]
        if len(set(names)) != len(names):
            raise InvalidInput(f"API key names must be unique: {sorted({n for n in names if names.count(n) > 1})}")
        if len(set(digests)) != len(digests):
            raise InvalidInput("two API keys have the same key_sha256: give every client its own key")
        self.keys = tuple(keys)

    @classmethod
    def parse(cls, text: str, fmt: str | None = None) -> KeyRing:
        """From JSON or TOML text (``fmt`` "json" / "toml"; None: JSON if it parses, else TOML)."""
        data: Any
        try:
            data = json.loads(text) if fmt in (None, "json") else tomllib.loads(text)
        except json.JSONDecodeError as exc:
            if fmt == "json":
                raise InvalidInput(f"the keys are not valid JSON: {exc}") from exc
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc2:
                raise InvalidInput(f"the keys are neither JSON ({exc}) nor TOML ({exc2})") from exc2
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"the keys are not valid TOML: {exc}") from exc
        if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
            raise InvalidInput('the keys must be an object with a "keys" list: {"keys": [{"name": ..., ...}]}')
        return cls([_entry(raw, i) for i, raw in enumerate(data["keys"])])

    @classmethod
    def load(cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> KeyRing:
        """From ``path`` (``.toml``: TOML, otherwise JSON), else from ``$MEMFUSION_API_KEYS``."""
        if path is not None:
            p = Path(path)
            try:
                text = p.read_text(encoding="utf-8")
            except OSError as exc:
                raise InvalidInput(f"cannot read the keys file {str(p)!r}: {exc.strerror}") from exc
            return cls.parse(text, "toml" if p.suffix.lower() == ".toml" else "json")
        env = os.environ if environ is None else environ
        inline = env.get(ENV_VAR)
        if not inline:
            raise InvalidInput(f"no API keys: pass --keys FILE or set {ENV_VAR} (JSON or TOML, see `serve --help`)")
        return cls.parse(inline)

    def authenticate(self, token: str | None) -> ApiKey | None:
        """The key whose digest matches ``token`` (None: missing or unknown). Every entry is
        compared with :func:`hmac.compare_digest`, so the time taken does not tell which matched."""
        if not token:
            return None
        digest = hash_key(token)
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.key_sha256):
                found = key
        return found


# --- the middleware ----------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


def _token(scope: Scope) -> str | None:
    auth = _header(scope, b"authorization")
    if auth is not None:
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return _header(scope, b"x-api-key")


class Authenticate:
    """ASGI middleware: 401 for a protected path (``/v1/...``; ``/metrics`` with
    ``protect_metrics``) without a known key, 429 past the key's rate, 403 for a route with a
    ``{ns}`` the key has no right on (``rw`` for the endpoints named in ``writes``), and for
    ``/metrics`` without the ``"*"`` wildcard (it tells about every tenant's traffic); else the
    caller's :class:`ApiKey` goes into ``scope[CALLER]``. All of it before the body is read, so
    a refusal never depends on the body, nor on whether the namespace exists."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        limiter: RateLimiter,
        limits: Limits,
        routes: Callable[[], list[BaseRoute]],
        writes: frozenset[str],
        protect_metrics: bool = False,
    ) -> None:
        self.app, self.keys, self.limiter, self.limits = app, keys, limiter, limits
        self.routes, self.writes, self.protect_metrics = routes, writes, protect_metrics

    def _allowed(self, scope: Scope, caller: ApiKey) -> bool:
        if scope["path"] == "/metrics":
            return caller.admin
        for route in self.routes():
            match, child = route.matches(scope)
            if match is Match.FULL:
                ns = child.get("path_params", {}).get("ns")
                return ns is None or caller.may(str(ns), getattr(route, "name", "") in self.writes)
        return True  # no route: the router answers 404 / 405

    def _protected(self, path: str) -> bool:
        return path.startswith("/v1/") or (path == "/metrics" and self.protect_metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        caller = self.keys.authenticate(_token(scope))
        if caller is None:
            response = JSONResponse({"detail": UNAUTHORIZED}, 401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        limits = self.limits
        try:
            self.limiter.check(caller.name, caller.rate_per_s or limits.rate_per_s, caller.burst or limits.burst)
        except RateLimited as exc:
            retry = str(max(1, math.ceil(exc.retry_after)))
            await JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": retry})(scope, receive, send)
            return
        if not self._allowed(scope, caller):
            await JSONResponse({"detail": FORBIDDEN}, 403)(scope, receive, send)
            return
        scope[CALLER] = caller
        await self.app(scope, receive, send)
