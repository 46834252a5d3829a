"""The fusion suite (``memfusion bench --suite fusion``): routes compared on accuracy, KV memory and latency.

A *route* is a router spec of :class:`memfusion.Engine`: ``"auto"`` (the shipped table), a fixed
strategy ``"POLICY"`` / ``"POLICY+store"`` or a router table ``.toml``. Every route answers the same
seeded questions of two *kinds* per context length:

- ``store``: the answer is only in the store. The document is a needle-in-a-haystack text of about
  ``length`` tokens (a :class:`~memfusion.bench.tasks.ruler.NiahSingle` sample's instruction and
  context; its needle is about another key); the sample's namespace holds ``n_facts`` facts
  ``"<key> is <value>"`` (4-digit values), one of them about the asked key; the question is
  :func:`~memfusion.models.tokenizer.format_question` of that key; the answer its value.
- ``context``: the answer is in the document. Same document; the question is the NIAH sample's own
  (about its needle's key, which is *not* in the store: the namespace holds ``n_facts`` other
  facts); the answer is the needle's value.

The prompt is ``document + "\\n" + question`` (the engine takes the last line as the question).
Each sample has its own namespace ``fusion-{length}-{kind}-{i}`` in one SQLite store
``out/fusion.db``.

Budgets: ``"auto"``, table routes and fixed *bounded* policies (window, snapkv, h2o, tiered, cca)
run under ``memory_budget_mb`` (bounded ones are sized to it); fixed *unbounded* policies (dense,
paged, quest, quant) cannot be sized and would raise :class:`~memfusion.errors.BudgetExceeded`, so
they run without a budget; each row records the budget it ran under (``budget_mb``, None = none).

``out/fusion.jsonl`` invariants: line 1 is a header (schema, settings, model, machine, versions);
every other line is one finished sample ``{"type": "sample", "length", "route", "kind", "i", ...}``
appended and flushed when it finishes, so an interrupted run leaves a valid file (a truncated last
line is ignored). A re-run skips the samples whose latest line has no error; failed samples run
again and their new line supersedes the old one. A file made with other settings
(:data:`SETTINGS`) is refused: use a fresh ``out``.

Analysis (summaries, the Pareto front) lives in :mod:`memfusion.bench.fusionsummary`, reports in
:mod:`memfusion.bench.fusionreport`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memfusion.bench.runner import LoadedModel, load_model, machine, versions
from memfusion.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from memfusion.engine import Engine
    from memfusion.store.base import Store

SCHEMA_VERSION = 1
"""Version of the fusion.jsonl layout; bump it when a field changes meaning."""
RESULTS_FILE = "fusion.jsonl"
STORE_FILE = "fusion.db"
KINDS = ("store", "context")
"""Question kinds: the answer only in the store / only in the document."""
VALUE_DIGITS = 4
"""Digits of the stored facts' values."""
MB = 1024 * 1024
"""Bytes of the MB of ``memory_budget_mb`` (the engine's unit): KV figures are reported in it too."""
UNBOUNDED = ("dense", "paged", "quest", "quant")
"""Policies whose KV grows with the context: as fixed routes they run without a memory budget."""
SETTINGS = ("model", "seed", "memory_budget_mb", "n_facts", "max_new_tokens", "prefill_chunk", "device")
"""Config fields a resumed run must share with its file (they change every figure). Lengths, routes
and samples may grow between runs: the new cells are added."""
ROUTES = ("auto", "dense", "dense+store", "window", "window+store", "snapkv", "quest")
QUICK: dict[str, Any] = {"lengths": (256, 512), "samples": 2, "routes": ("auto", "dense", "window+store")}
"""The quick preset (CI, tests): :meth:`FusionConfig.quick`."""

Step = Callable[[str, int, int], None]
"""``step(label, done, total)``: called before each sample and once at the end (``done == total``)."""


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInput(f"{name} must be an integer >= {low}, got {value!r}")


def route_budget_mb(route: str, memory_budget_mb: float) -> float | None:
    """The memory budget ``route`` runs under: None for a fixed unbounded policy (dense, paged,
    quest, quant, with or without ``+store``), else ``memory_budget_mb``."""
    policy, plus, _ = route.partition("+")
    fixed = plus or not (route == "auto" or route.endswith(".toml"))
    return None if fixed and policy in UNBOUNDED else memory_budget_mb


def _check_route(route: Any) -> None:
    from memfusion.router import Router

    if not isinstance(route, str) or not route.strip():
        raise InvalidInput(
            f"every route must be a non-empty string ('auto', 'POLICY' or 'POLICY+store'), got {route!r}"
        )
    try:
        Router.from_spec(route)
    except NotFound as exc:
        raise InvalidInput(f"route {route!r}: {exc}; a route is 'auto', 'POLICY', 'POLICY+store' or a .toml") from None
    except InvalidInput as exc:
        raise InvalidInput(f"route {route!r} is not valid: {exc}") from None


@dataclass(frozen=True)
class FusionConfig:
    """One fusion run. ``samples``: per question kind per length; ``n_facts``: facts in each
    sample's namespace; ``memory_budget_mb`` (MB = 2**20 bytes): the budget of ``auto`` and of the
    bounded routes (see the module docstring); ``model``: ``"random"``, ``"reference"`` or a local
    checkpoint directory (:func:`memfusion.bench.runner.load_model`); ``out``: the directory of
    ``fusion.jsonl``, ``fusion.db`` and the report; ``prefill_chunk``: the engine's prefill chunk
    (one chunk in flight counts in the KV peak)."""

    lengths: tuple[int, ...] = (1024, 2048, 4096)
    samples: int = 6
    memory_budget_mb: float = 0.75
    routes: tuple[str, ...] = ROUTES
    n_facts: int = 24
    seed: int = 0
    model: str = "reference"
    max_new_tokens: int = 10
    out: Path = Path("reports/fusion")
    device: str = "cpu"
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        from memfusion.bench.tasks.ruler import N_KEYS

        object.__setattr__(self, "lengths", tuple(self.lengths))
        object.__setattr__(self, "routes", tuple(self.routes))
        object.__setattr__(self, "out", Path(self.out))
        if not self.lengths:
            raise InvalidInput("lengths must hold at least one context length (tokens), e.g. (1024, 2048, 4096)")
        for n in self.lengths:
            _positive_int("every length", n, 64)
        if len(set(self.lengths)) != len(self.lengths):
            raise InvalidInput(f"lengths must be distinct, got {self.lengths}")
        _positive_int("samples (per question kind per length)", self.samples)
        b = self.memory_budget_mb
        if isinstance(b, bool) or not isinstance(b, int | float) or not (math.isfinite(b) and b > 0):
            raise InvalidInput(f"memory_budget_mb must be a positive number of MB, got {b!r}")
        if not self.routes:
            raise InvalidInput(f"routes must name at least one route, e.g. {ROUTES}")
        for route in self.routes:
            _check_route(route)
        if len(set(self.routes)) != len(self.routes):
            raise InvalidInput(f"routes must be distinct, got {self.routes}")
        _positive_int("n_facts", self.n_facts)
        if self.n_facts > N_KEYS // 2:
            raise InvalidInput(f"n_facts must be <= {N_KEYS // 2} (half the distinct keys), got {self.n_facts}")
        _positive_int("seed", self.seed, 0)
        if not isinstance(self.model, str) or not self.model:
            raise InvalidInput("model must be 'random', 'reference' or the path of a local checkpoint directory")
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_int("prefill_chunk", self.prefill_chunk)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidInput(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> FusionConfig:
        """The quick preset: lengths (256, 512), 2 samples, routes auto, dense, window+store."""
        return cls(**{**QUICK, **overrides})

    def budget_for(self, route: str) -> float | None:
        return route_budget_mb(route, self.memory_budget_mb)

    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SETTINGS}


# --- scenarios --------------------------------------------------------------------------------

_NIAH_KEY = re.compile(r"special magic number for (?P<key>.+?) mentioned")


@dataclass(frozen=True)
class Scenario:
    """One question. Invariants: ``prompt == document + "\\n" + question`` and the question is one
    line; ``facts`` are the namespace's (key, value) pairs, keys distinct, none equal to the
    needle's key; ``kind == "store"``: ``(asked_key, answer)`` is in ``facts`` and neither the key
    nor the answer occurs in the document; ``kind == "context"``: the answer (the needle's value)
    is in the document and ``asked_key`` (the needle's key) is not among ``facts``."""

    length: int
    kind: str
    i: int
    namespace: str
    document: str
    question: str
    answer: str
    asked_key: str
    facts: tuple[tuple[str, str], ...]

    @property
    def prompt(self) -> str:
        return self.document + "\n" + self.question

    @property
    def fact_texts(self) -> list[str]:
        """The texts stored: ``"<key> is <value>"`` (what :meth:`memfusion.Engine.remember` parses)."""
        return [f"{k} is {v}" for k, v in self.facts]

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.length, self.kind, self.i)


def _occurs(needle: str, text: str) -> bool:
    """``needle`` occurs in ``text`` as whole words / a whole number (case-insensitive)."""
    pattern = r"(?<![a-z0-9])" + re.escape(" ".join(needle.lower().split())) + r"(?![a-z0-9])"
    return re.search(pattern, " ".join(text.lower().split())) is not None


def _facts(rng: random.Random, n: int, document: str, exclude: set[str]) -> list[tuple[str, str]]:
    """``n`` facts with distinct keys outside ``exclude`` and distinct 4-digit values, none of
    whose keys or values occurs in ``document``."""
    from memfusion.bench.tasks.ruler import N_KEYS, _keys, _numbers

    keys = [k for k in _keys(rng, min(N_KEYS, 2 * n + len(exclude))) if k not in exclude and not _occurs(k, document)]
    values = [v for v in _numbers(rng, min(9000, 2 * n + 16), VALUE_DIGITS) if not _occurs(v, document)]
    if len(keys) < n or len(values) < n:
        raise InvalidInput(f"cannot draw {n} facts absent from the document; use fewer n_facts")
    return list(zip(keys[:n], values[:n], strict=True))


def scenarios(cfg: FusionConfig, tokenizer: Any) -> list[Scenario]:
    """Every question of the run, by length, kind, then sample: deterministic for ``cfg.seed``."""
    from memfusion.bench.tasks.ruler import NiahSingle

    out: list[Scenario] = []
    for length in cfg.lengths:
        niah = NiahSingle().generate(tokenizer, length, cfg.samples, seed=cfg.seed)
        for kind in KINDS:
            for i, sample in enumerate(niah):
                out.append(_scenario(cfg, length, kind, i, sample))
    return out


def _scenario(cfg: FusionConfig, length: int, kind: str, i: int, sample: Any) -> Scenario:
    from memfusion.models.tokenizer import format_question

    m = _NIAH_KEY.search(sample.question)
    if m is None:
        raise InvalidInput(f"cannot find the needle's key in the NIAH question {sample.question!r}")
    needle_key = m.group("key")
    document = (sample.instruction + sample.context).rstrip()
    rng = random.Random(f"fusion/{cfg.seed}/{length}/{kind}/{i}")
    facts = _facts(rng, cfg.n_facts, document, {needle_key})
    if kind == "store":
        asked_key, answer = facts[rng.randrange(len(facts))]
        question = format_question(asked_key)
    else:
        asked_key, answer = needle_key, sample.answers[0]
        question = sample.question.strip()
    return Scenario(length, kind, i, f"fusion-{length}-{kind}-{i}", document, question, answer, asked_key, tuple(facts))


def populate(store: Store, scenario: Scenario) -> bool:
    """Write the scenario's facts into its namespace in one transaction (all or none), with the
    metadata :meth:`memfusion.Engine.remember` gives them; False when the namespace already has
    memories (a resumed run)."""
    from memfusion.engine.engine import FACT_KEY, FACT_VALUE
    from memfusion.engine.prompt import parse_fact
    from memfusion.store.records import PutItem

    if store.audit(scenario.namespace, limit=1):
        return False
    items = []
    for text in scenario.fact_texts:
        key, value = parse_fact(text)
        items.append(PutItem(key=key, text=text, metadata={FACT_KEY: key, FACT_VALUE: value}))
    store.put_many(scenario.namespace, items, actor="bench-fusion")
    return True


# --- the results file -------------------------------------------------------------------------

RowKey = tuple[int, str, str, int]
"""(length, route, kind, i): one sample of one route."""


def row_key(row: dict[str, Any]) -> RowKey:
    return (int(row["length"]), str(row["route"]), str(row["kind"]), int(row["i"]))


def read_results(path: str | Path) -> tuple[dict[str, Any], dict[RowKey, dict[str, Any]]]:
    """The header and the latest row of every (length, route, kind, i), in file order."""
    p = Path(path)
    p = p / RESULTS_FILE if p.suffix != ".jsonl" else p
    if not p.is_file():
        raise NotFound(f"no fusion results at {p}: run `memfusion bench --suite fusion --out DIR` first")
    lines = p.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == len(lines) - 1:  # cut short by a killed process: that sample did not finish
                break
            raise InvalidInput(f"{p}: line {n + 1} is not JSON ({exc}); the file is damaged") from exc
    if not records or records[0].get("type") != "header" or records[0].get("suite") != "fusion":
        raise InvalidInput(f"{p} is not a fusion results file (its first line is not a fusion header)")
    if records[0].get("schema") != SCHEMA_VERSION:
        raise InvalidInput(
            f"{p} has fusion schema {records[0].get('schema')!r}; this memfusion reads schema {SCHEMA_VERSION}: "
            "re-run into a fresh out directory"
        )
    return records[0], {row_key(r): r for r in records[1:] if r.get("type") == "sample"}


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def header(cfg: FusionConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """The first line of fusion.jsonl (also the report's header)."""
    config = asdict(cfg)
    config["out"] = str(cfg.out)
    return {
        "type": "header",
        "suite": "fusion",
        "schema": SCHEMA_VERSION,
        **cfg.settings(),
        "config": config,
        "model_random": None if loaded is None else loaded.random,
        "model_info": {} if loaded is None else {**loaded.info, "max_positions": loaded.max_positions},
        "machine": machine(cfg.device),
        "versions": versions(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --- one sample -------------------------------------------------------------------------------


def run_sample(engine: Engine, scenario: Scenario, route: str, cfg: FusionConfig) -> dict[str, Any]:
    """Ask ``scenario`` through ``engine`` (the route's), score with ``exact``: one results row.
    An exception (not Ctrl-C) becomes a row with ``error`` set and no figures."""
    from memfusion.bench.tasks.longcontext import exact

    row: dict[str, Any] = {
        "type": "sample",
        "length": scenario.length,
        "route": route,
        "kind": scenario.kind,
        "i": scenario.i,
        "namespace": scenario.namespace,
        "answer": scenario.answer,
        "budget_mb": engine.memory_budget_mb,
        "error": None,
    }
    t0 = time.perf_counter()
    try:
        out = engine.generate(scenario.prompt, namespace=scenario.namespace, max_new_tokens=cfg.max_new_tokens)
    except Exception as exc:  # a failing cell is a result: recorded, and the run goes on
        row.update(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
        return row
    kv, lat = out.stats.kv, out.stats.latency
    # kv.generate decodes one step per generated token after the first (the first comes from
    # prefill); a stop at EOS generates len(tokens) + 1 tokens (EOS is cut from out.tokens)
    steps = min(len(out.tokens), cfg.max_new_tokens - 1)
    row.update(
        strategy=out.route.strategy,
        kv_policy=out.route.kv_policy,
        kv_params=out.route.kv_params,
        retrieved=bool(out.stats.retrieved),
        retrieved_keys=[h.record.key for h in out.stats.retrieved],
        answer_in_prompt=_occurs(scenario.answer, out.prompt),
        output=out.text,
        correct=exact(out.text, [scenario.answer]) == 1.0,
        kv_peak_bytes=None if kv is None else int(kv.peak_bytes),
        kv_resident_bytes=None if kv is None else int(kv.bytes_resident),
        prompt_tokens=out.stats.prompt_tokens,
        new_tokens=out.stats.new_tokens,
        decode_steps=steps,
        retrieval_s=lat["retrieval"],
        prefill_s=lat["prefill"],
        decode_s=lat["decode"],
        total_s=lat["total"],
        within_budget=out.stats.within_budget,
        seconds=time.perf_counter() - t0,
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return row


# --- the run ----------------------------------------------------------------------------------


@dataclass
class FusionRun:
    """What one call of :func:`run` did; ``report``: name -> path of the report files."""

    path: Path
    ran: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    report: dict[str, Path] = field(default_factory=dict)


def _check_lengths(cfg: FusionConfig, loaded: LoadedModel) -> None:
    # a prompt is the length (+2 %) plus a question and the retrieved facts (< 128 tokens)
    need = [n for n in cfg.lengths if n * 1.02 + 128 + cfg.max_new_tokens > loaded.max_positions]
    if need:
        raise InvalidInput(
            f"lengths {need} are beyond the model's limit: {loaded.name} has max_position_embeddings "
            f"{loaded.max_positions}; a prompt (+2%) with its question, facts and {cfg.max_new_tokens} new tokens "
            f"must fit: use lengths <= {int((loaded.max_positions - 128 - cfg.max_new_tokens) / 1.02)}"
        )


def _label(length: int, route: str, sc: Scenario) -> str:
    return f"fusion {length} tokens | {route} | {sc.kind} #{sc.i}"


def run(
    cfg: FusionConfig,
    *,
    step: Step | None = None,
    loader: Callable[[str, str, int], LoadedModel] = load_model,
    report: bool = True,
) -> FusionRun:
    """Run every unfinished sample of ``cfg`` (length x route x kind x sample), appending to
    ``cfg.out/fusion.jsonl``; then write the report (:func:`memfusion.bench.fusionreport.write`).

    Setup errors (settings of an existing file, the model, lengths beyond its limit) raise before
    anything runs. Ctrl-C stops after the finished samples: the report is still written and
    ``interrupted`` is set.
    """
    from memfusion.engine import Engine
    from memfusion.store import open_store

    path = cfg.out / RESULTS_FILE
    previous: dict[str, Any] | None = None
    done: dict[RowKey, dict[str, Any]] = {}
    if path.exists():
        previous, done = read_results(path)
        for name, value in cfg.settings().items():
            if previous.get(name) != value:
                raise InvalidInput(
                    f"{path} holds results made with {name}={previous.get(name)!r}, this run has {name}={value!r}: "
                    "use another out directory (or the same settings to resume)"
                )
    loaded = loader(cfg.model, cfg.device, cfg.seed)
    _check_lengths(cfg, loaded)
    cfg.out.mkdir(parents=True, exist_ok=True)
    head = header(cfg, loaded)
    if previous is None:
        _append(path, head)
    result = FusionRun(path)
    total = len(cfg.lengths) * len(cfg.routes) * len(KINDS) * cfg.samples
    if step:
        step("fusion: preparing the questions and the store", 0, total)
    store = open_store(f"sqlite:///{cfg.out / STORE_FILE}")
    try:
        questions = scenarios(cfg, loaded.tokenizer)
        for sc in questions:
            populate(store, sc)
        engines: dict[str, Engine] = {}
        cells = [(route, sc) for n in cfg.lengths for route in cfg.routes for sc in questions if sc.length == n]
        for k, (route, sc) in enumerate(cells):
            if step:
                step(_label(sc.length, route, sc), k, total)
            old = done.get((sc.length, route, sc.kind, sc.i))
            if old is not None and old.get("error") is None:
                result.skipped += 1
                continue
            if route not in engines:  # one engine (and so one monitor) per route
                engines[route] = Engine(
                    loaded.model,
                    loaded.tokenizer,
                    store=store,
                    router=route,
                    memory_budget_mb=cfg.budget_for(route),
                    prefill_chunk=cfg.prefill_chunk,
                )
            row = run_sample(engines[route], sc, route, cfg)
            _append(path, row)
            result.ran += 1
            result.failed += row["error"] is not None
        if step:
            step("fusion: done", total, total)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        store.close()
    if report:
        from memfusion.bench import fusionreport

        file_header, rows = read_results(path)
        result.report = fusionreport.write(list(rows.values()), cfg, cfg.out, header=file_header)
    return result
