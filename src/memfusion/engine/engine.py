"""The fusion engine: one request through the router, the store, the KV policy and the monitor.

``Engine.generate(prompt, namespace=...)``:

1. the question (the prompt's last line) is searched in the namespace of the store (when there is
   a store and a namespace, and the route's store mode is not ``never``);
2. the router decides whether the retrieved facts pay (best-hit similarity against the calibrated
   threshold; not when the best hit's key already appears in the document) and which KV policy,
   sized to ``memory_budget_mb``, runs the request (:class:`memfusion.router.Route`, with reasons);
3. the retrieved facts within the table's ``margin`` of the best hit go right before the question
   (:func:`memfusion.engine.prompt.with_facts`), so a bounded policy keeps them; the model decodes
   greedily under the policy (:func:`memfusion.kv.generate`);
4. with ``write_back=True`` the facts the user wrote in ``<facts>`` blocks are stored;
5. the monitor records the request (latency split, KV bytes, retrieval hits, route) and its trace.

Invariants: a namespace only ever reads its own memories (every store call carries it); the KV
peak reported in the stats is measured, and ``stats.within_budget`` compares it with the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from memfusion.engine.prompt import facts_in_prompt, key_in_context, parse_fact, split_prompt, with_facts
from memfusion.errors import InvalidInput, NotFound
from memfusion.kv.stats import KVStats
from memfusion.monitor import Monitor, RequestFigures, Trace
from memfusion.router import Request, RetrievalSignal, Route, Router, Table, estimate_task
from memfusion.store.base import Store
from memfusion.store.records import Hit, Record

FACT_KEY, FACT_VALUE = "fact_key", "fact_value"
"""Metadata fields of a remembered fact (the key and value put in context)."""


@dataclass
class EngineStats:
    """Figures of one request. ``latency`` (seconds): ``retrieval``, ``prefill``, ``decode``,
    ``total``; ``kv``: the KV policy's exact stats; ``retrieved``: the store hits put in context."""

    kv: KVStats | None
    prompt_tokens: int
    new_tokens: int
    latency: dict[str, float]
    retrieved: list[Hit] = field(default_factory=list)
    best_score: float | None = None
    memory_budget_bytes: int | None = None
    written: list[Record] = field(default_factory=list)
    trace: dict[str, Any] = field(default_factory=dict)

    @property
    def within_budget(self) -> bool:
        """The measured KV peak fits the memory budget (always True without one)."""
        if self.memory_budget_bytes is None or self.kv is None:
            return True
        return self.kv.peak_bytes <= self.memory_budget_bytes


@dataclass
class EngineOutput:
    text: str
    tokens: list[int]
    route: Route
    stats: EngineStats
    prompt: str
    """The prompt the model read (retrieved facts included)."""


@dataclass
class _Plan:
    route: Route
    prompt: str
    ids: Any  # (1, T) long
    hits: list[Hit]
    best_score: float | None


class Engine:
    """``Engine(model, tokenizer, store=None, router="auto", memory_budget_mb=None,
    latency_budget_ms=None)``. ``router``: ``"auto"`` (the shipped table), a strategy name
    (``"window"``, ``"quest+store"``), a ``.toml`` path, a :class:`~memfusion.router.Table` or a
    :class:`~memfusion.router.Router`. ``monitor``: a :class:`~memfusion.monitor.Monitor` (one is
    made when not given; ``engine.monitor.exposition()`` is the Prometheus text)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: Store | None = None,
        router: str | Path | Table | Router = "auto",
        memory_budget_mb: float | None = None,
        latency_budget_ms: float | None = None,
        monitor: Monitor | None = None,
        prefill_chunk: int = 512,
        write_back: bool = False,
    ) -> None:
        from memfusion.kv.spec import ModelSpec

        self.spec = ModelSpec.from_model(model)  # UnsupportedModel for a model memfusion.kv cannot run
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.router = Router.from_spec(router)
        self.monitor = monitor if monitor is not None else Monitor()
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise InvalidInput(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.write_back = write_back
        # validated once here (Request checks them again per call)
        Request(1, 1, memory_budget_mb=memory_budget_mb, latency_budget_ms=latency_budget_ms)
        self.memory_budget_mb = memory_budget_mb
        self.latency_budget_ms = latency_budget_ms
        self.token_bytes = self.spec.num_layers * self.spec.token_bytes
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_tokens: int | None = limit if isinstance(limit, int) and limit > 0 else None

    # --- memories -----------------------------------------------------------------------------

    def _store(self) -> Store:
        if self.store is None:
            raise InvalidInput("this Engine has no store: pass store=memfusion.open_store(URL)")
        return self.store

    def remember(
        self,
        namespace: str,
        text: str,
        *,
        key: str | None = None,
        metadata: dict[str, Any] | None = None,
        expected_version: int | None = None,
        actor: str = "engine",
    ) -> Record:
        """Store ``text`` as a fact of ``namespace`` (persistent, versioned): its key and value come
        from :func:`~memfusion.engine.prompt.parse_fact`; with ``key=``, ``text`` is the value of
        that key. Remembering a key again makes a new version."""
        fact_key, value = parse_fact(text)
        if key is not None:
            fact_key, value = " ".join(str(key).split()).lower(), " ".join(text.split()).rstrip(".")
            if not fact_key:
                raise InvalidInput("key must be a non-empty string")
        meta = {**(metadata or {}), FACT_KEY: fact_key, FACT_VALUE: value}
        return self._store().put(
            namespace, fact_key, text, metadata=meta, expected_version=expected_version, actor=actor
        )

    def _check_namespace(self, namespace: str) -> None:
        if not isinstance(namespace, str) or not namespace.strip():
            raise InvalidInput(f"namespace must be a non-empty string, got {namespace!r}")
        if not self._store().audit(namespace, limit=1):
            raise NotFound(f"unknown namespace {namespace!r}: it has no memories; remember() a fact in it first")

    # --- requests -----------------------------------------------------------------------------

    def _count(self, text: str) -> Any:
        import torch

        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])

    def _request(self, n_tokens: int, task: str) -> Request:
        return Request(
            n_tokens=n_tokens,
            token_bytes=self.token_bytes,
            task=task,
            memory_budget_mb=self.memory_budget_mb,
            latency_budget_ms=self.latency_budget_ms,
            prefill_chunk=self.prefill_chunk,
            elem_bytes=self.spec.elem_bytes,
            layers=self.spec.num_layers,
        )

    def _plan(
        self,
        prompt: str,
        namespace: str | None,
        as_of: datetime | None,
        task: str | None,
        max_new_tokens: int,
        trace: Trace,
    ) -> _Plan:
        document, question = split_prompt(prompt)
        ids = self._count(prompt)
        kind = task if task is not None else estimate_task(prompt, int(ids.shape[1]))
        signal: RetrievalSignal | None = None
        hits: list[Hit] = []
        base = self._request(int(ids.shape[1]) + max_new_tokens, kind)
        if namespace is not None and self.router.store_mode(base) != "never":
            self._check_namespace(namespace)
            with trace.span("retrieval", namespace=namespace) as span:
                hits = self._store().search(namespace, question, k=self.router.table.retrieval.k, as_of=as_of)
                span.set(hits=len(hits))
            best = hits[0] if hits else None
            in_context = best is not None and key_in_context(
                str(best.record.metadata.get(FACT_KEY, best.record.key)), document
            )
            signal = RetrievalSignal(None if best is None else best.score, in_context)
        elif namespace is not None:
            self._check_namespace(namespace)
            signal = RetrievalSignal(None)
        retrieve, _ = self.router.should_retrieve(base, signal)
        used: list[Hit] = []
        if retrieve:
            settings = self.router.table.retrieval
            floor = settings.min_score if self.router.store_mode(base) == "auto" else -1.0
            if hits:  # facts near the best hit only: one that merely resembles the question misleads
                floor = max(floor, hits[0].score - settings.margin)
            used = [h for h in hits if h.score >= floor] or hits[:1]
            facts = [
                (
                    str(h.record.metadata.get(FACT_KEY, h.record.key)),
                    str(h.record.metadata.get(FACT_VALUE, h.record.text)),
                )
                for h in used
            ]
            prompt = with_facts(document, facts, question)
            ids = self._count(prompt)
        n = int(ids.shape[1])
        if self.max_tokens is not None and n + max_new_tokens > self.max_tokens:
            raise InvalidInput(
                f"the prompt has {n} tokens (+{max_new_tokens} to generate), beyond the model's limit of "
                f"{self.max_tokens} (max_position_embeddings): shorten it"
            )
        route = self.router.route(self._request(n + max_new_tokens, kind), signal)
        trace.event("route", strategy=route.strategy, reasons=list(route.reasons))
        return _Plan(route, prompt, ids, used, signal.best_score if signal else None)

    def explain(
        self, prompt: str, namespace: str | None = None, *, as_of: datetime | None = None, task: str | None = None
    ) -> Route:
        """The route :meth:`generate` would take (the store is searched; nothing is generated)."""
        return self._plan(prompt, namespace, as_of, task, 1, Trace()).route

    def generate(
        self,
        prompt: str,
        namespace: str | None = None,
        *,
        max_new_tokens: int = 32,
        as_of: datetime | None = None,
        task: str | None = None,
    ) -> EngineOutput:
        """Answer ``prompt`` with the memories of ``namespace`` (None: no store). ``as_of``: read
        the store as it was then. ``task``: the task type (estimated from the prompt when None)."""
        import time

        from memfusion.kv import generate as kv_generate

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        trace = Trace()
        trace.set(namespace=namespace)
        start = time.perf_counter()
        try:
            plan = self._plan(prompt, namespace, as_of, task, max_new_tokens, trace)
            with trace.span("generate", policy=plan.route.kv_policy, tokens=int(plan.ids.shape[1])):
                res = kv_generate(
                    self.model,
                    plan.ids,
                    plan.route.kv_policy,
                    max_new_tokens=max_new_tokens,
                    prefill_chunk=self.prefill_chunk,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **plan.route.kv_params,
                )
            written = self._write_back(prompt, namespace) if self.write_back and namespace is not None else []
        except Exception:
            self.monitor.observe(RequestFigures(status="error", trace=trace))
            raise
        new = res.sequences[0, plan.ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        tokens = new[: new.index(eos)] if eos is not None and eos in new else new
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        latency = {
            "retrieval": trace.seconds("retrieval"),
            "prefill": res.prefill_seconds,
            "decode": float(sum(res.decode_seconds)),
            "total": time.perf_counter() - start,
        }
        stats = EngineStats(
            kv=res.stats,
            prompt_tokens=int(plan.ids.shape[1]),
            new_tokens=len(tokens),
            latency=latency,
            retrieved=plan.hits,
            best_score=plan.best_score,
            memory_budget_bytes=None if self.memory_budget_mb is None else int(self.memory_budget_mb * 1024 * 1024),
            written=written,
            trace=trace.to_dict(),
        )
        self.monitor.observe(
            RequestFigures(
                status="ok",
                route=plan.route.strategy,
                prefill_seconds=res.prefill_seconds,
                decode_seconds=latency["decode"],
                new_tokens=len(new),
                prompt_tokens=stats.prompt_tokens,
                retrieval_seconds=latency["retrieval"] if namespace is not None else None,
                retrieval_hits=len(plan.hits),
                retrieval_misses=int(plan.best_score is not None and not plan.hits),
                kv_bytes_resident=res.stats.bytes_resident,
                kv_peak_bytes=res.stats.peak_bytes,
                prefix_hits=res.stats.prefix_hits,
                prefix_lookups=res.stats.prefix_lookups,
                trace=trace,
            )
        )
        stats.trace = trace.to_dict()
        return EngineOutput(text, tokens, plan.route, stats, plan.prompt)

    def _write_back(self, prompt: str, namespace: str) -> list[Record]:
        """Store the ``<facts>`` lines of the user's prompt whose value differs from the stored one."""
        out = []
        store = self._store()
        for key, value in facts_in_prompt(prompt):
            try:
                if str(store.get(namespace, key).metadata.get(FACT_VALUE)) == value:
                    continue
            except NotFound:
                pass
            out.append(self.remember(namespace, value, key=key, actor="engine-write-back"))
        return out
