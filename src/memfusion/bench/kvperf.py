"""KV-policy performance: decode latency, attention time, exact KV bytes, against HF in one run.

Every figure is measured in the same process, on the same random-initialised model and the
same prompt: the baseline is ``transformers``' own forward loop with ``DynamicCache`` (what
``model.generate`` runs). Times are medians over decode steps with their inter-quartile range;
ratios are taken against the baseline of the same run.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import memfusion.kv as kv
from memfusion.errors import InvalidInput


@dataclass(frozen=True)
class KVBenchConfig:
    """What to run. ``budget`` is the token budget of every bounded policy (a fixed number, so
    their memory must stay flat as the context grows); quest gets ``context // quest_fraction``."""

    contexts: tuple[int, ...] = (4096, 16384, 32768)
    policies: tuple[str, ...] = ("dense", "paged", "quest", "window", "snapkv", "h2o", "cca", "quant", "tiered")
    new_tokens: int = 32
    layers: int = 4
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 1024
    prefill_chunk: int = 1024
    bounded_chunk: int = 64
    budget: int = 2048
    quest_fraction: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.contexts or min(self.contexts) < 64:
            raise InvalidInput(f"contexts must be >= 64 tokens, got {self.contexts}")
        unknown = [p for p in self.policies if p not in kv.POLICIES]
        if unknown:
            raise InvalidInput(f"unknown policies {unknown}; valid: {', '.join(sorted(kv.POLICIES))}")
        if self.new_tokens < 4:
            raise InvalidInput("new_tokens must be >= 4 to take a median over decode steps")

    def params(self, policy: str, context: int) -> tuple[dict[str, Any], int]:
        """The policy's parameters at this context, and the prefill chunk it runs with."""
        b = self.budget
        table: dict[str, dict[str, Any]] = {
            "paged": {"page_size": 16},
            "quest": {"token_budget": max(16, context // self.quest_fraction), "page_size": 16},
            "window": {"window": b - 4, "sinks": 4},
            "snapkv": {"budget": b, "obs_window": 32},
            "h2o": {"budget": b, "recent": 64},
            "cca": {"group_size": 16, "local": b},
            "quant": {"bits": 4, "group_size": 32, "residual": 128},
            "tiered": {"window": b, "page_size": 16, "retrieve_pages": 8},
        }
        cfg_cls = kv.POLICIES[policy]
        chunk = self.bounded_chunk if cfg_cls.bounded and policy != "quant" else self.prefill_chunk
        return table.get(policy, {}), chunk


@dataclass
class Spread:
    """Median and inter-quartile range of a sample, in milliseconds."""

    median: float
    p25: float
    p75: float
    n: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Spread:
        ms = sorted(s * 1e3 for s in seconds)
        if len(ms) < 2:
            only = ms[0] if ms else float("nan")
            return cls(only, only, only, len(ms))
        q = statistics.quantiles(ms, n=4)
        return cls(statistics.median(ms), q[0], q[2], len(ms))

    def __str__(self) -> str:
        return f"{self.median:.2f} [{self.p25:.2f}-{self.p75:.2f}]"


@dataclass
class PolicyRow:
    policy: str
    context: int
    params: dict[str, Any]
    prefill_chunk: int
    prefill_s: float
    decode_ms: Spread
    decode_ratio: float  # our median / HF median, same run
    attend_ms: float  # median over decode steps of the time summed over layers
    attend_ms_layer: float | None  # median over decode steps of the mean over the layers a policy compresses
    attend_ms_mean: float  # mean over decode steps of the time summed over layers
    kv_read_gbps: float | None  # dense/paged: K/V bytes read per step / attention time
    stream_copy_gbps: float | None  # dense/paged: STREAM copy measured just before this row (the machine's
    # bandwidth moves by up to 2x within minutes here, so the read rate is compared with a neighbour)
    bytes_resident: int
    peak_bytes: int
    analytic_bytes: int
    bytes_offloaded: int
    tokens_resident: int
    page_selection: float | None
    prefix_hit_rate: float | None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class KVBenchReport:
    config: KVBenchConfig
    machine: dict[str, str]
    stream_copy_gbps: float
    baseline: dict[int, Spread]
    rows: list[PolicyRow]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def machine_info() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "device": "cpu",
    }


def stream_copy_bandwidth(mib: int = 256, repeats: int = 9) -> float:
    """STREAM-style copy bandwidth in GB/s (bytes read + bytes written, as STREAM counts)."""
    src = torch.ones(mib * 1024 * 1024 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def reference_llama(cfg: KVBenchConfig, max_context: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max_context + cfg.new_tokens + 8,
    )
    return LlamaForCausalLM(mc).eval()


@torch.inference_mode()
def hf_decode_seconds(model: Any, ids: torch.Tensor, new_tokens: int, chunk: int) -> list[float]:
    """transformers' own loop with DynamicCache (as model.generate): per-token decode times."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    name = kv.cache_kwarg(model)
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s : s + chunk], **{name: cache}, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = model(tok, **{name: cache}, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return times


def _compressed_layers(policy: str, params: dict[str, Any], n_layers: int) -> list[int]:
    if policy == "quest":
        return list(range(kv.resolve(policy, **params).dense_layers, n_layers))  # type: ignore[attr-defined]
    return list(range(n_layers))


def run_policy(model: Any, ids: torch.Tensor, cfg: KVBenchConfig, policy: str, hf: Spread) -> PolicyRow:
    context = ids.shape[1]
    reads_all = policy in ("dense", "paged")
    stream = stream_copy_bandwidth() if reads_all else None
    params, chunk = cfg.params(policy, context)
    res = kv.generate(model, ids, policy, max_new_tokens=cfg.new_tokens, prefill_chunk=chunk, **params)
    steps = len(res.decode_seconds)
    cache = res.cache
    # Per decode step: the sum over layers, and the mean over the layers the policy compresses;
    # medians over the steps, as for decode times (a one-off step, e.g. the storage doubling on the
    # first token past a power of two, moves the mean, reported beside them, not the median).
    per_step = list(zip(*cache.decode_attend_steps, strict=True))  # steps x layers
    layers = _compressed_layers(policy, params, cache.spec.num_layers)
    attend_total = statistics.median(sum(t) for t in per_step) if per_step else float("nan")
    attend_sel = statistics.median(sum(t[i] for i in layers) / len(layers) for t in per_step) if per_step else None
    attend_mean = sum(cache.decode_attend_seconds) / steps if steps else float("nan")
    decode = Spread.of(res.decode_seconds)
    kv_read = None
    if reads_all and steps:
        # Each decode step of a layer reads every resident K and V once.
        per_layer_bytes = res.stats.bytes_resident / cache.spec.num_layers
        kv_read = per_layer_bytes / (attend_total / cache.spec.num_layers) / 1e9
    s = res.stats
    analytic = kv.resolve(policy, **params).analytic_bytes(s.tokens_seen, cache.spec)
    return PolicyRow(
        policy=policy,
        context=context,
        params=params,
        prefill_chunk=chunk,
        prefill_s=res.prefill_seconds,
        decode_ms=decode,
        decode_ratio=decode.median / hf.median,
        attend_ms=attend_total * 1e3,
        attend_ms_mean=attend_mean * 1e3,
        attend_ms_layer=None if attend_sel is None else attend_sel * 1e3,
        kv_read_gbps=kv_read,
        stream_copy_gbps=stream,
        bytes_resident=s.bytes_resident,
        peak_bytes=s.peak_bytes,
        analytic_bytes=analytic,
        bytes_offloaded=s.bytes_offloaded,
        tokens_resident=s.tokens_resident,
        page_selection=s.page_selection_ratio if s.pages_total else None,
        prefix_hit_rate=s.prefix_hit_rate if s.prefix_lookups else None,
        extra=dict(s.extra),
    )


def run(cfg: KVBenchConfig, progress: Callable[[str], None] | None = None) -> KVBenchReport:
    """Run every policy at every context; ``progress(label)`` is called before each unit."""
    note = progress or (lambda _label: None)
    model = reference_llama(cfg, max(cfg.contexts))
    note("stream bandwidth")
    bw = stream_copy_bandwidth()
    baseline: dict[int, Spread] = {}
    rows: list[PolicyRow] = []
    for context in cfg.contexts:
        g = torch.Generator().manual_seed(cfg.seed + context)
        ids = torch.randint(0, cfg.vocab, (1, context), generator=g)
        note(f"{context} tokens: transformers DynamicCache")
        baseline[context] = Spread.of(hf_decode_seconds(model, ids, cfg.new_tokens, cfg.prefill_chunk))
        for policy in cfg.policies:
            note(f"{context} tokens: {policy}")
            rows.append(run_policy(model, ids, cfg, policy, baseline[context]))
    return KVBenchReport(cfg, machine_info(), bw, baseline, rows)
