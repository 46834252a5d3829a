"""Request and response bodies of ``memfusion serve`` (pydantic; they make the OpenAPI schema).

Requests forbid unknown fields; integers are strict (``"5"`` and ``true`` are not integers; an
integral ``5.0`` is, as in JSON Schema); every datetime is ISO 8601 *with* a timezone
(``2025-01-31T12:00:00Z``). The store's rules that a schema can state are in the schema (key
characters, metadata key names, non-blank text, the filter's shape); the rest (text and metadata
byte sizes, ``valid_from < valid_to``) are checked by the store and answered with 422 too.
Responses mirror :mod:`memfusion.store.records`; times are UTC.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from memfusion.serve.limits import MAX_NEW_TOKENS_CAP
from memfusion.store.base import MAX_K, MAX_KEY_CHARS, MAX_TEXT_BYTES
from memfusion.store.options import MAX_REASON_CHARS
from memfusion.store.records import AuditEntry, ConsistencyReport, Edge, Hit, Record

NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
"""The store's namespace rule."""
KEY_PATTERN = r"^[^\x00-\x1f\x7f]+$"
"""Record keys, nodes, relations: no control characters (and at most 512 characters)."""
FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
"""Metadata and filter keys."""
NOT_BLANK = r"\S"
"""Somewhere a character that is not white space."""
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
PATTERN_HELP = {
    NAMESPACE_PATTERN: "a namespace is 1-128 letters, digits and _ . : @ - (starting with a letter or digit)",
    KEY_PATTERN: "must not contain control characters (U+0000-U+001F, U+007F)",
    FIELD_PATTERN: "metadata and filter keys must match [A-Za-z_][A-Za-z0-9_.-]{0,63}",
    NOT_BLANK: "must not be blank (to remove a fact, DELETE it)",
}
"""What each pattern means, for the 422 messages."""
MAX_VERSION = 2**53
MAX_TTL_S = 100 * 365.25 * 86400.0
"""Bounds the store itself has no need of, but SQL integers and datetimes do (100 years of ttl)."""


def _utc(t: datetime) -> datetime:
    try:
        return t.astimezone(UTC)
    except OverflowError:
        raise ValueError("this time is out of range once converted to UTC (years 1 to 9999)") from None


def _iso(value: Any) -> Any:
    """A time must be an ISO 8601 string (pydantic would also read ``266`` as a Unix time)."""
    if (isinstance(value, str) and not _NUMBER.match(value.strip())) or isinstance(value, datetime):
        return value
    raise ValueError("must be an ISO 8601 date-time with a timezone, like 2025-01-31T12:00:00Z")


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes ``5.0``: take an integral float as the int (nothing else)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Time = Annotated[AwareDatetime, BeforeValidator(_iso), AfterValidator(_utc)]
"""ISO 8601 with a timezone, held as UTC."""
Version = Annotated[int, BeforeValidator(_integral), Field(strict=True, ge=0, le=MAX_VERSION)]
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS, pattern=KEY_PATTERN)]
FieldName = Annotated[str, Field(pattern=FIELD_PATTERN)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_BYTES, pattern=NOT_BLANK)]
Reason = Annotated[str, Field(max_length=MAX_REASON_CHARS)]
Seconds = Annotated[float, Field(strict=True, gt=0, le=MAX_TTL_S, allow_inf_nan=False)]  # strict: true is no number
Metadata = dict[FieldName, Any]
Task = Literal["chat", "document", "code", "agent", "knowledge"]
"""The router's ``TASK_TYPES`` (a test keeps the two in step)."""
ConflictName = Literal["last_writer_wins", "reject", "keep_both"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnyOf(_Request):
    """A filter on one of several values: ``{"$in": [values]}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    values: list[Any] = Field(alias="$in")


def _one_filter_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One clear message instead of one per member of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(
            'a filter value is a JSON value (equality) or {"$in": [values]}; $in is the only operator'
        ) from None


FilterValue = Annotated[str | int | float | bool | list[Any] | AnyOf | None, WrapValidator(_one_filter_error)]


class PutBody(_Request):
    """A new version of a key. ``expected_version``: compare-and-set (0: the key must not
    exist; 409 with ``current_version`` if stale). ``on_conflict``: what a write *without*
    ``expected_version`` does when the key is live (see ``ConflictPolicy``)."""

    text: Text = Field(description="The fact (UTF-8, at most 32 KiB).")
    metadata: Metadata | None = Field(None, description="A JSON object (at most 16 KiB once encoded).")
    expected_version: Version | None = None
    reason: Reason | None = None
    ttl: Seconds | None = Field(None, description="Expire after this many seconds.")
    valid_from: Time | None = None
    valid_to: Time | None = None
    on_conflict: ConflictName = "last_writer_wins"


class SearchBody(_Request):
    """The ``k`` visible records most similar to ``query``; ``filter``: ``{key: value}`` or
    ``{key: {"$in": [values]}}``, all ANDed; ``as_of``: the store as it was then."""

    query: Text
    k: Annotated[int, BeforeValidator(_integral), Field(strict=True, ge=1, le=MAX_K)] = 5
    filter: dict[FieldName, FilterValue] | None = None
    as_of: Time | None = None
    valid_at: Time | None = None

    def store_filter(self) -> dict[str, Any] | None:
        """The filter as the store takes it (:class:`AnyOf` back to ``{"$in": [...]}``)."""
        if self.filter is None:
            return None
        return {k: v.model_dump(by_alias=True) if isinstance(v, AnyOf) else v for k, v in self.filter.items()}


class LinkBody(_Request):
    """A (new version of the) edge ``src -[relation]-> dst``."""

    src: Key
    relation: Key
    dst: Key
    metadata: Metadata | None = None
    valid_from: Time | None = None
    valid_to: Time | None = None


class GenerateBody(_Request):
    """One request to the engine. ``namespace``: whose memories to use (read right needed; None:
    none); ``timeout_s``: a deadline shorter than the server's (queueing included, 504 past it)."""

    prompt: Annotated[str, Field(min_length=1, pattern=NOT_BLANK)]
    namespace: str | None = None
    max_new_tokens: Annotated[int, BeforeValidator(_integral), Field(strict=True, ge=1, le=MAX_NEW_TOKENS_CAP)] = 32
    as_of: Time | None = None
    task: Task | None = None
    timeout_s: Seconds | None = None


class RecordOut(BaseModel):
    namespace: str
    key: str
    version: int
    text: str
    metadata: dict[str, Any]
    committed_at: datetime
    actor: str
    reason: str | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    expires_at: datetime | None = None
    deleted: bool = False

    @classmethod
    def of(cls, r: Record) -> RecordOut:
        return cls(**{f.name: getattr(r, f.name) for f in dataclasses.fields(r)})


class HitOut(BaseModel):
    record: RecordOut
    score: float

    @classmethod
    def of(cls, h: Hit) -> HitOut:
        return cls(record=RecordOut.of(h.record), score=h.score)


class EdgeOut(BaseModel):
    namespace: str
    src: str
    relation: str
    dst: str
    version: int
    committed_at: datetime
    actor: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    deleted: bool = False

    @classmethod
    def of(cls, e: Edge) -> EdgeOut:
        return cls(**{f.name: getattr(e, f.name) for f in dataclasses.fields(e)})


class AuditOut(BaseModel):
    seq: int
    namespace: str
    key: str
    op: Literal["put", "delete", "link", "unlink", "reject", "compact", "repair"]
    actor: str
    at: datetime
    old_version: int | None
    new_version: int | None
    policy: str | None = None
    reason: str | None = None

    @classmethod
    def of(cls, a: AuditEntry) -> AuditOut:
        values = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
        return cls(**{**values, "op": a.op.value})


class CheckOut(BaseModel):
    ok: bool
    records: int
    indexed: int
    missing: list[int]
    stale: list[int]
    orphans: list[int]
    broken_chains: list[list[str]]
    live_mismatch: list[int]

    @classmethod
    def of(cls, r: ConsistencyReport) -> CheckOut:
        return cls(
            ok=r.ok,
            records=r.records,
            indexed=r.indexed,
            missing=r.missing,
            stale=r.stale,
            orphans=r.orphans,
            broken_chains=[list(c) for c in r.broken_chains],
            live_mismatch=r.live_mismatch,
        )


class GenerateStatsOut(BaseModel):
    """The engine's figures: ``latency`` in seconds (retrieval, prefill, decode, total); ``kv``:
    the KV policy's stats; ``retrieved``: the store hits put in context."""

    prompt_tokens: int
    new_tokens: int
    latency: dict[str, float]
    retrieved: list[HitOut]
    best_score: float | None
    within_budget: bool
    kv: dict[str, Any] | None


class GenerateOut(BaseModel):
    text: str
    tokens: list[int]
    route: dict[str, Any] = Field(description="The router's decision (strategy, KV policy, reasons, inputs).")
    stats: GenerateStatsOut
    prompt: str = Field(description="The prompt the model read (retrieved facts included).")


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every error: ``detail`` says what was wrong; a 409 adds ``current_version``; a 422 from
    the schema adds ``errors`` (one per field)."""

    detail: str
    current_version: int | None = None
    errors: list[ErrorItem] | None = None


class Health(BaseModel):
    status: str
