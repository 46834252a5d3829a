"""The task suites of ``memfusion bench``, as data: policies x lengths x tasks x samples x budgets.

A *cell* of a suite is one ``(task, policy, length, budget)``: ``samples`` prompts of that task at
that length, decoded with that policy. ``budgets`` are KV budgets as a fraction of the context
length (``token_budget = round(fraction * length)``); they apply to the policies that take a
budget (:data:`BUDGET_PARAMS`); the others (dense, paged, quant) run once per length, with budget
``None`` (they keep every token).

``quick`` / ``full`` are aliases of ``tasks-quick`` / ``tasks-full`` (:data:`SUITE_ALIASES`), run
on the shipped reference model by default; the KV *performance* suites of
:mod:`memfusion.bench.kvperf` are ``kv-quick`` and ``kv``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from memfusion.errors import InvalidInput

PAGE = 16
"""Page size of the page-based policies (paged, quest, tiered) in every suite."""

BUDGET_PARAMS: dict[str, Callable[[int], dict[str, Any]]] = {
    "window": lambda b: {"window": max(1, b - 4), "sinks": 4},
    "snapkv": lambda b: {"budget": b, "obs_window": max(1, min(32, b // 2))},
    "h2o": lambda b: {"budget": b, "recent": max(0, min(64, b // 4))},
    "cca": lambda b: {"group_size": PAGE, "local": b},
    "quest": lambda b: {"token_budget": max(PAGE, b), "page_size": PAGE, "dense_layers": 1, "oracle_recall": True},
    "tiered": lambda b: {"window": b, "page_size": PAGE, "retrieve_pages": 4},
}
"""Policy parameters from a token budget ``b`` (tokens kept or attended per KV head)."""

FIXED_PARAMS: dict[str, dict[str, Any]] = {
    "dense": {},
    "paged": {"page_size": PAGE},
    "quant": {"bits": 4, "group_size": 32, "residual": 128},
}
"""Parameters of the policies that keep every token (no budget)."""


def policy_params(policy: str, length: int, budget: float | None) -> dict[str, Any]:
    """The keyword parameters of ``memfusion.kv.generate`` for ``policy`` at this length and budget."""
    if policy in BUDGET_PARAMS:
        if budget is None:
            raise InvalidInput(f"policy {policy!r} needs a KV budget (a fraction of the context length)")
        return BUDGET_PARAMS[policy](max(1, round(budget * length)))
    if policy in FIXED_PARAMS:
        return dict(FIXED_PARAMS[policy])
    raise InvalidInput(f"unknown policy {policy!r}; valid policies: {', '.join(sorted(known_policies()))}")


def known_policies() -> list[str]:
    """Policies the harness knows how to parametrise."""
    return sorted({*BUDGET_PARAMS, *FIXED_PARAMS})


@dataclass(frozen=True)
class Cell:
    """One unit of work and of the results file: its identity is ``key``."""

    task: str
    policy: str
    length: int
    budget: float | None

    @property
    def key(self) -> str:
        budget = "-" if self.budget is None else f"{self.budget:g}"
        return f"{self.task}/{self.policy}/{self.length}/{budget}"

    def __str__(self) -> str:
        b = "" if self.budget is None else f" budget {self.budget:g}"
        return f"{self.task} | {self.policy}{b} | {self.length} tokens"


@dataclass(frozen=True)
class Suite:
    """A grid to run. Invariants (checked): non-empty tuples, lengths >= 64, budgets in (0, 1],
    samples >= 1, new_tokens >= 2 (at least one timed decode step), batch sizes >= 1."""

    name: str
    description: str
    tasks: tuple[str, ...]
    policies: tuple[str, ...]
    lengths: tuple[int, ...]
    budgets: tuple[float, ...]
    samples: int
    new_tokens: int = 12
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        for name in ("tasks", "policies", "lengths", "budgets"):
            if not getattr(self, name):
                raise InvalidInput(f"suite {self.name!r}: {name} must not be empty")
        if any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise InvalidInput(f"suite {self.name!r}: lengths must be integers >= 64 tokens, got {self.lengths}")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise InvalidInput(
                f"suite {self.name!r}: budgets are fractions of the context length in (0, 1], got {self.budgets}"
            )
        if self.samples < 1 or self.new_tokens < 2 or self.prefill_chunk < 1:
            raise InvalidInput(
                f"suite {self.name!r}: samples >= 1, new_tokens >= 2 and prefill_chunk >= 1 are required, got "
                f"{self.samples}, {self.new_tokens}, {self.prefill_chunk}"
            )
        unknown = [p for p in self.policies if p not in known_policies()]
        if unknown:
            raise InvalidInput(f"unknown policies {unknown}; valid policies: {', '.join(known_policies())}")

    def cells(self) -> list[Cell]:
        """Every cell, task-major then policy, length, budget (the order they run in)."""
        out: list[Cell] = []
        for task in self.tasks:
            for policy in self.policies:
                budgets: tuple[float | None, ...] = self.budgets if policy in BUDGET_PARAMS else (None,)
                for length in self.lengths:
                    out.extend(Cell(task, policy, length, b) for b in budgets)
        return out

    def select(
        self,
        tasks: tuple[str, ...] | None = None,
        policies: tuple[str, ...] | None = None,
        lengths: tuple[int, ...] | None = None,
    ) -> Suite:
        """This suite with some of its axes replaced (the CLI's ``--tasks`` / ``--policies`` / ``--lengths``)."""
        return replace(
            self, tasks=tasks or self.tasks, policies=policies or self.policies, lengths=lengths or self.lengths
        )


ALL_POLICIES = ("dense", "paged", "window", "snapkv", "h2o", "cca", "quest", "tiered", "quant")

SUITES: dict[str, Suite] = {
    "smoke": Suite(
        name="smoke",
        description="CI check of the harness: under a minute on 2 CPU cores",
        tasks=("niah_single", "kv_lookup"),
        policies=("dense", "window", "quest"),
        lengths=(256, 512),
        budgets=(0.25,),
        samples=2,
        new_tokens=8,
        prefill_chunk=128,
    ),
    "tasks-quick": Suite(
        name="tasks-quick",
        description="every policy on three tasks at 1K and 2K tokens: at most 5 minutes on 2 CPU cores",
        tasks=("niah_single", "passkey", "kv_lookup"),
        policies=ALL_POLICIES,
        lengths=(1024, 2048),
        budgets=(0.25,),
        samples=4,
        new_tokens=8,
        prefill_chunk=512,
    ),
    "tasks-full": Suite(
        name="tasks-full",
        description="the grid the report plots: every task and policy, 1K-8K tokens, three budgets",
        tasks=(
            "niah_single",
            "niah_multikey",
            "niah_multivalue",
            "niah_multiquery",
            "passkey",
            "variable_tracking",
            "common_words",
            "frequent_words",
            "kv_lookup",
        ),
        policies=ALL_POLICIES,
        lengths=(1024, 2048, 4096, 8192),
        budgets=(0.125, 0.25, 0.5),
        samples=10,
        new_tokens=16,
        prefill_chunk=512,
    ),
}
"""The task suites by name."""

SUITE_ALIASES: dict[str, str] = {"quick": "tasks-quick", "full": "tasks-full"}
"""Names that resolve to a task suite: ``memfusion bench`` (``--suite quick``) runs the task suite on
the shipped reference model; the KV performance suites are ``kv-quick`` and ``kv``."""


def task_suite_name(name: str) -> str | None:
    """The task suite ``name`` stands for (through :data:`SUITE_ALIASES`), or None if it is not one."""
    name = SUITE_ALIASES.get(name, name)
    return name if name in SUITES else None


def get_suite(name: str) -> Suite:
    """The task suite ``name`` (or an alias of one); :class:`InvalidInput` lists the valid names."""
    resolved = task_suite_name(name)
    if resolved is None:
        raise InvalidInput(f"unknown task suite {name!r}; valid: {', '.join([*SUITES, *SUITE_ALIASES])}")
    return SUITES[resolved]
