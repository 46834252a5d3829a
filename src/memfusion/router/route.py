"""Routing one request: the task type, the KV policy sized to the memory budget, and whether the
store pays. Every decision comes back as a :class:`Route` with the inputs that drove it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memfusion.errors import BudgetExceeded, InvalidInput
from memfusion.router.budget import BOUNDED, Sizing, policy_params, size_policy, smallest_feasible_bytes
from memfusion.router.table import KNOWN_POLICIES, TASK_TYPES, Rule, Table, load_table

MB = 1024 * 1024
_CODE = re.compile(r"(^|\n)\s*(def |class |import |from \S+ import|#include|function |public |fn )|[{};]\s*\n")
_QUESTION = re.compile(r"(\?|\bquestion:|<v>)\s*$")


def estimate_task(prompt: str, n_tokens: int) -> str:
    """A task type of :data:`~memfusion.router.table.TASK_TYPES` from the prompt alone: ``code``
    when code lines appear (3 or more), ``knowledge`` for a short question (< 256 tokens) with no
    document, ``document`` for 1,024 tokens or more, else ``chat``."""
    if len(_CODE.findall(prompt)) >= 3:
        return "code"
    if n_tokens < 256 and _QUESTION.search(prompt.strip()) and "\n" not in prompt.strip():
        return "knowledge"
    return "document" if n_tokens >= 1024 else "chat"


@dataclass(frozen=True)
class Request:
    """What the router sees of a request. ``token_bytes``: KV bytes of one token over all layers;
    ``n_tokens``: the prompt as it will be prefilled (retrieved facts included) plus the tokens to
    generate."""

    n_tokens: int
    token_bytes: int
    task: str = "chat"
    memory_budget_mb: float | None = None
    latency_budget_ms: float | None = None
    prefill_chunk: int = 512
    elem_bytes: int = 4
    layers: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASK_TYPES:
            raise InvalidInput(f"task must be one of {', '.join(TASK_TYPES)}, got {self.task!r}")
        if min(self.n_tokens, self.token_bytes, self.prefill_chunk, self.layers) < 1:
            raise InvalidInput("n_tokens, token_bytes, prefill_chunk and layers must be >= 1")
        for name in ("memory_budget_mb", "latency_budget_ms"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0 and value == value):
                raise InvalidInput(f"{name} must be a positive number or None, got {value!r}")

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * MB)


@dataclass(frozen=True)
class Route:
    """The decision for one request. ``strategy`` names it (``"window+store"``: the window policy
    with retrieved facts in context); ``kv_policy`` / ``kv_params`` go to
    :func:`memfusion.kv.generate`; ``estimated_peak_bytes`` is the budget model's figure (the
    engine's stats carry the measured one); ``reasons`` say why, in order; ``inputs`` are the
    figures that drove it."""

    strategy: str
    kv_policy: str
    kv_params: dict[str, Any]
    token_budget: int
    estimated_peak_bytes: int
    retrieve: bool
    task: str
    rule: str
    reasons: tuple[str, ...] = ()
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def explain(self) -> str:
        """A few lines for a person: the strategy, then each reason."""
        head = f"route: {self.strategy} (task {self.task}, KV {self.kv_policy} {self.kv_params})"
        return "\n".join([head, *(f"  - {r}" for r in self.reasons)])


@dataclass(frozen=True)
class RetrievalSignal:
    """What a store search said about a request: the best hit's similarity (None: no hit) and
    whether the best hit's key already appears in the prompt's document."""

    best_score: float | None
    in_context: bool = False


class Router:
    """``Router()`` routes by the shipped table; ``Router(table)`` by yours; ``Router.fixed("window",
    store="never")`` always picks one policy (sized to the budget when bounded) — the fixed
    strategies the fusion suite compares ``auto`` against."""

    def __init__(self, table: Table | None = None, fixed: tuple[str, str] | None = None) -> None:
        self.table = table if table is not None else load_table()
        self._fixed = fixed
        if fixed is not None:
            self._fixed_rule = Rule(policy=fixed[0], store=fixed[1], why=f"fixed strategy {fixed[0]}")

    @classmethod
    def fixed(cls, policy: str, store: str = "never", table: Table | None = None) -> Router:
        return cls(table, fixed=(policy, store))

    @classmethod
    def from_spec(cls, spec: str | Path | Table | Router) -> Router:
        """``"auto"``, a strategy name (``"window"``, ``"quest+store"``), a TOML path, a Table or a Router."""
        if isinstance(spec, Router):
            return spec
        if isinstance(spec, Table):
            return cls(spec)
        if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".toml")):
            return cls(load_table(spec))
        if not isinstance(spec, str):
            raise InvalidInput(f"router must be 'auto', a strategy name, a .toml path or a Router, got {spec!r}")
        if spec == "auto":
            return cls()
        policy, plus, extra = spec.partition("+")
        if policy not in KNOWN_POLICIES or (plus and extra != "store"):
            valid = ", ".join(sorted(KNOWN_POLICIES))
            raise InvalidInput(f"unknown router {spec!r}: use 'auto', a policy ({valid}) or POLICY+store, or a .toml")
        return cls.fixed(policy, "always" if plus else "never")

    @property
    def is_fixed(self) -> bool:
        return self._fixed is not None

    def rule_for(self, req: Request) -> Rule:
        if self._fixed is not None:
            return self._fixed_rule
        return self.table.match(req.task, req.n_tokens, req.latency_budget_ms)

    def store_mode(self, req: Request) -> str:
        return self.rule_for(req).store

    def size_kv(self, req: Request, retrieve: bool = False) -> tuple[Rule, Sizing, list[str]]:
        """The rule's policy, else (when ``retrieve``) its ``store_policy``, else its first fallback,
        that fits the memory budget; raises :class:`BudgetExceeded` naming the smallest budget that
        any of them could meet."""
        rule = self.rule_for(req)
        mem = req.memory_bytes
        reasons = [f"rule: {rule.why}" if rule.why else f"rule: {rule.policy}"]
        extra = (rule.store_policy,) if retrieve and rule.store_policy else ()
        candidates = tuple(dict.fromkeys((rule.policy, *extra, *rule.fallbacks)))
        for policy in candidates:
            sizing = size_policy(
                policy, req.n_tokens, mem, req.token_bytes, req.prefill_chunk, req.elem_bytes, req.layers
            )
            if sizing is not None:
                if policy != rule.policy and policy in extra:
                    reasons.append(
                        f"{rule.policy} does not fit {req.memory_budget_mb} MB and retrieval pays: {policy} keeps "
                        "the retrieved facts before the question and drops the document's distant tokens"
                    )
                elif policy != rule.policy:
                    reasons.append(f"{rule.policy} does not fit {req.memory_budget_mb} MB: fallback {policy}")
                if policy in BOUNDED and sizing.budget < req.n_tokens:
                    reasons.append(f"{policy} sized to {sizing.budget} of {req.n_tokens} tokens to fit the budget")
                return rule, sizing, reasons
        need = smallest_feasible_bytes(
            candidates, req.n_tokens, req.token_bytes, req.prefill_chunk, req.elem_bytes, req.layers
        )
        raise BudgetExceeded(
            f"no strategy fits {req.memory_budget_mb} MB for {req.n_tokens} tokens (tried {', '.join(candidates)}); "
            f"the smallest feasible memory budget is {need / MB:.3f} MB (memory_budget_mb={need / MB:.3f})"
        )

    def should_retrieve(self, req: Request, signal: RetrievalSignal | None) -> tuple[bool, str]:
        """Whether retrieved facts go into context, and why."""
        mode = self.store_mode(req)
        if signal is None:
            return False, "no store or namespace: no retrieval"
        if mode == "never":
            return False, "strategy never uses the store"
        if signal.best_score is None:
            return False, "the store has no memory for this namespace"
        if mode == "always":
            return True, f"strategy always retrieves (best hit similarity {signal.best_score:.3f})"
        threshold = self.table.retrieval.min_score
        if signal.in_context:
            return False, "the best hit's key already appears in the context: answered from the context"
        if signal.best_score < threshold:
            return False, f"best hit similarity {signal.best_score:.3f} < threshold {threshold:.3f}: does not pay"
        return True, f"best hit similarity {signal.best_score:.3f} >= threshold {threshold:.3f}"

    def route(self, req: Request, signal: RetrievalSignal | None = None) -> Route:
        """The full decision for ``req`` (``signal``: the store's answer, None without a store)."""
        retrieve, why_store = self.should_retrieve(req, signal)
        rule, sizing, reasons = self.size_kv(req, retrieve)
        reasons.append(why_store)
        inputs = {
            "n_tokens": req.n_tokens,
            "task": req.task,
            "memory_budget_mb": req.memory_budget_mb,
            "latency_budget_ms": req.latency_budget_ms,
            "token_bytes": req.token_bytes,
            "best_score": None if signal is None else signal.best_score,
            "in_context": None if signal is None else signal.in_context,
            "min_score": self.table.retrieval.min_score,
        }
        return Route(
            strategy=sizing.policy + ("+store" if retrieve else ""),
            kv_policy=sizing.policy,
            kv_params=policy_params(sizing.policy, sizing.budget),
            token_budget=sizing.budget,
            estimated_peak_bytes=sizing.peak_bytes,
            retrieve=retrieve,
            task=req.task,
            rule=rule.why,
            reasons=tuple(reasons),
            inputs=inputs,
        )
