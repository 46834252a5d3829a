"""The selection matrix: rules read from TOML (``table.toml`` beside this file by default).

Invariants of a loaded :class:`Table` (checked at load, :class:`InvalidInput` otherwise): every
policy and fallback is a policy of :data:`memfusion.kv.POLICIES` that the router can size
(:mod:`memfusion.router.budget`); every task is one of :data:`TASK_TYPES`; ``store`` is one of
:data:`STORE_MODES`; the last rule matches every request (``task = "any"`` and no condition), so
routing never falls off the table.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memfusion.errors import InvalidInput, NotFound
from memfusion.router.budget import BOUNDED, UNBOUNDED

DEFAULT_TABLE = Path(__file__).with_name("table.toml")
TASK_TYPES = ("chat", "document", "code", "agent", "knowledge")
STORE_MODES = ("auto", "always", "never")
KNOWN_POLICIES = (*UNBOUNDED, *BOUNDED)


@dataclass(frozen=True)
class Rule:
    """One row of the matrix: conditions (None = any) -> a policy, its fallbacks and store mode."""

    policy: str
    task: str = "any"
    min_tokens: int | None = None
    max_tokens: int | None = None
    max_latency_ms: float | None = None
    store: str = "auto"
    fallbacks: tuple[str, ...] = ()
    why: str = ""
    #: When retrieval pays and ``policy`` does not fit the memory budget, this policy is tried before
    #: the fallbacks: the retrieved facts sit right before the question, so a recency policy keeps the
    #: answer and drops the document's distant tokens (and their competing values).
    store_policy: str | None = None

    def __post_init__(self) -> None:
        for name in (self.policy, *self.fallbacks, *((self.store_policy,) if self.store_policy else ())):
            if name not in KNOWN_POLICIES:
                raise InvalidInput(
                    f"router table: unknown strategy {name!r}; valid policies: {', '.join(sorted(KNOWN_POLICIES))}"
                )
        if self.task != "any" and self.task not in TASK_TYPES:
            raise InvalidInput(f"router table: unknown task {self.task!r}; valid: any, {', '.join(TASK_TYPES)}")
        if self.store not in STORE_MODES:
            raise InvalidInput(f"router table: store must be one of {STORE_MODES}, got {self.store!r}")
        for bound in (self.min_tokens, self.max_tokens):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
                raise InvalidInput(f"router table: min_tokens / max_tokens must be integers >= 0, got {bound!r}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise InvalidInput(f"router table: max_latency_ms must be > 0, got {self.max_latency_ms!r}")

    @property
    def unconditional(self) -> bool:
        conditions = (self.min_tokens, self.max_tokens, self.max_latency_ms)
        return self.task == "any" and all(c is None for c in conditions)

    def matches(self, task: str, n_tokens: int, latency_ms: float | None) -> bool:
        return (
            self.task in ("any", task)
            and (self.min_tokens is None or n_tokens >= self.min_tokens)
            and (self.max_tokens is None or n_tokens < self.max_tokens)
            and (self.max_latency_ms is None or (latency_ms is not None and latency_ms <= self.max_latency_ms))
        )


@dataclass(frozen=True)
class RetrievalSettings:
    """When the store pays: the best hit's cosine similarity must reach ``min_score``; then the hits
    among the best ``k`` whose similarity is within ``margin`` of the best one go into context (the
    best always does). A fact that only resembles the question costs tokens and, for a model that
    tells keys apart poorly, the answer: ``memfusion route calibrate`` fits ``margin`` too."""

    min_score: float = 0.5
    k: int = 4
    margin: float = 2.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_score <= 1.0:
            raise InvalidInput(f"retrieval.min_score is a cosine similarity in [-1, 1], got {self.min_score}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 64:
            raise InvalidInput(f"retrieval.k must be an integer in [1, 64], got {self.k!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float) or not 0 <= self.margin <= 2:
            raise InvalidInput(f"retrieval.margin is a cosine-similarity difference in [0, 2], got {self.margin!r}")


@dataclass(frozen=True)
class Table:
    rules: tuple[Rule, ...]
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.rules or not self.rules[-1].unconditional:
            raise InvalidInput(
                f'router table {self.source}: the last rule must match everything (task = "any", no conditions)'
            )

    def match(self, task: str, n_tokens: int, latency_ms: float | None) -> Rule:
        """The first rule that holds (the last one always does)."""
        return next(r for r in self.rules if r.matches(task, n_tokens, latency_ms))

    def with_retrieval(self, **settings: Any) -> Table:
        """The table with some :class:`RetrievalSettings` fields replaced (``min_score=``, ``margin=``)."""
        return replace(self, retrieval=replace(self.retrieval, **settings))

    def to_toml(self) -> str:
        """The table as TOML (what :func:`load_table` reads back)."""
        lines = [
            "# memfusion router table (see memfusion/router/table.toml for the meaning of each field)",
            "[retrieval]",
            f"min_score = {self.retrieval.min_score!r}",
            f"k = {self.retrieval.k}",
            f"margin = {self.retrieval.margin!r}",
        ]
        for r in self.rules:
            lines += ["", "[[rule]]", f'task = "{r.task}"']
            for name in ("min_tokens", "max_tokens", "max_latency_ms"):
                if getattr(r, name) is not None:
                    lines.append(f"{name} = {getattr(r, name)!r}")
            fallbacks = ", ".join(f'"{f}"' for f in r.fallbacks)
            lines += [f'policy = "{r.policy}"', f'store = "{r.store}"', f"fallbacks = [{fallbacks}]"]
            if r.store_policy is not None:
                lines.append(f'store_policy = "{r.store_policy}"')
            lines.append(f"why = {_quote(r.why)}")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_RULE_FIELDS = {
    "policy",
    "task",
    "min_tokens",
    "max_tokens",
    "max_latency_ms",
    "store",
    "fallbacks",
    "why",
    "store_policy",
}


def parse_table(data: dict[str, Any], source: str = "<memory>") -> Table:
    """A :class:`Table` from parsed TOML (``{"retrieval": {...}, "rule": [{...}, ...]}``)."""
    unknown = set(data) - {"retrieval", "rule"}
    if unknown:
        raise InvalidInput(f"router table {source}: unknown sections {sorted(unknown)}; valid: retrieval, rule")
    rules = []
    for i, raw in enumerate(data.get("rule", [])):
        if not isinstance(raw, dict) or "policy" not in raw:
            raise InvalidInput(f"router table {source}: rule {i} needs a policy")
        extra = set(raw) - _RULE_FIELDS
        if extra:
            raise InvalidInput(f"router table {source}: rule {i} has unknown fields {sorted(extra)}")
        rules.append(Rule(**{**raw, "fallbacks": tuple(raw.get("fallbacks", ()))}))
    retrieval = data.get("retrieval", {})
    if not isinstance(retrieval, dict) or set(retrieval) - {"min_score", "k", "margin"}:
        raise InvalidInput(f"router table {source}: [retrieval] takes min_score, k and margin")
    return Table(tuple(rules), RetrievalSettings(**retrieval), source)


def load_table(path: str | Path | None = None) -> Table:
    """Read a table (default: the shipped one)."""
    file = DEFAULT_TABLE if path is None else Path(path)
    if not file.is_file():
        raise NotFound(f"no router table at {file}")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"router table {file} is not valid TOML: {exc}") from None
    return parse_table(data, str(file))
