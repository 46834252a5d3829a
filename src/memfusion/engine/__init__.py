"""The fusion engine: a model, its KV policy, the store and the router as one system.

eng = memfusion.Engine(model, tokenizer, store=memfusion.open_store("sqlite:///mem.db"),
                       router="auto", memory_budget_mb=64)
eng.remember("alice", "amber falcon is 4721")
out = eng.generate(document + "\\n" + question, namespace="alice", max_new_tokens=8)
out.text, out.route.explain(), out.stats.latency, out.stats.kv.peak_bytes
"""

from __future__ import annotations

from memfusion.engine.engine import Engine, EngineOutput, EngineStats
from memfusion.engine.prompt import facts_in_prompt, parse_fact, split_prompt, with_facts

__all__ = ["Engine", "EngineOutput", "EngineStats", "facts_in_prompt", "parse_fact", "split_prompt", "with_facts"]
