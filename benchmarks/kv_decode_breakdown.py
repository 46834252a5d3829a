"""Where a decode step's attention time goes, beside what `memfusion bench --suite kv` reports.

    .venv/bin/python benchmarks/kv_decode_breakdown.py            # 4K A/B, quest at 32K, prefill at 8K
    .venv/bin/python benchmarks/kv_decode_breakdown.py --ab 4096 --quest 32768 --prefill 32768
    .venv/bin/python benchmarks/kv_decode_breakdown.py --ab 0 --quest 0 --prefill 0   # the kernel alone
    .venv/bin/python benchmarks/kv_decode_breakdown.py --ab 0 --quest 0 --prefill 0 --kernel '' --prefetch 4096,32768
    .venv/bin/python benchmarks/kv_decode_breakdown.py --ab 0 --quest 0 --prefill 0 --kernel '' --bounds 32768
    .venv/bin/python benchmarks/kv_decode_breakdown.py --ab 0 --quest 0 --prefill 0 --kernel '' --hugepages 32768

1. A/B in one process (the benchmark model of `--suite kv`, batch 1): HF's DynamicCache loop,
   `dense` and `paged` (split-K kernel) and `dense` on the torch ops, interleaved ``--reps`` times:
   decode ms/token and attention ms per layer (medians over decode steps).
2. Quest's decode step at ``--quest`` tokens (budget T/8, 16-token pages) on 4 layers' worth of
   buffers: the whole layer step and its kernels (append, page selection and attention), medians;
   with quest's default bfloat16 page bounds and with ``exact_bounds`` (float32), interleaved.
3. Prefill seconds of `dense` and `paged` at ``--prefill`` tokens (1,024-token chunks).
4. The split-K kernel alone (``decodeattn.decode_attention``, the benchmark model's 2 KV heads x 4
   query heads, head dim 64) at each of ``--kernel`` contexts: on one buffer read over and over
   (warm: from the caches where it fits) and on buffers rotated through 96 MiB (cold: from memory,
   as in a decode step, where the model's weights pass through the caches between two reads of a
   layer's K/V), and the fixed cost of a call (one key). Median us per call and K/V GB/s.
5. The kernel's software prefetch on and off (``jitkernels.attention_kernel``'s ``ahead_rows``, 12
   and 0), interleaved call by call on buffers rotated through 96 MiB (from memory), at each of
   ``--prefetch`` contexts: dense's contiguous runs and quest's scattered pages (16 rows, 1 in 8 per
   KV head, ascending). Median us per call.
6. Quest's page bounds in the benchmark model at ``--bounds`` tokens (budget T/8, 16-token pages):
   bfloat16 rounded outward (the default) against ``exact_bounds`` (float32), two caches prefilled
   once and decoded step by step in turn (``--steps`` each): attention ms per compressed layer
   (store + select + attend, as the report's attn ms/layer), median and quartiles, the share of
   selected pages the two have in common, and each one's oracle recall (8 more steps, two new caches).
7. Quest's K/V pages in the benchmark model at ``--hugepages`` tokens (budget T/8, 16-token pages):
   on transparent huge pages (the default, :mod:`memfusion.kv.hugepages`) against 4 KiB pages
   (``MEMFUSION_HUGEPAGES=0``), decoded in turn as in 6.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import memfusion.kv as kv
import memfusion.kv.jitkernels as jit
from memfusion.bench.kvperf import KVBenchConfig, hf_decode_seconds, reference_llama
from memfusion.kv import decodeattn, pageattn
from memfusion.kv.hf import attach
from memfusion.kv.quest import Quest, QuestLayer
from memfusion.kv.spec import ModelSpec


def decode(model: Any, ids: torch.Tensor, policy: str) -> tuple[float, float]:
    """(decode ms/token, attention ms per layer), medians over 31 decode steps."""
    res = kv.generate(model, ids, policy, max_new_tokens=32, prefill_chunk=1024)
    steps = list(zip(*res.cache.decode_attend_steps, strict=True))
    layers = res.cache.spec.num_layers
    return statistics.median(res.decode_seconds) * 1e3, statistics.median(sum(s) for s in steps) / layers * 1e3


def ab(context: int, reps: int) -> None:
    model = reference_llama(KVBenchConfig(contexts=(context,)), context)
    ids = torch.randint(0, 1024, (1, context), generator=torch.Generator().manual_seed(1))
    print(f"## A/B at {context} tokens: decode ms/token (attention ms per layer)")
    for rep in range(reps):
        hf = statistics.median(hf_decode_seconds(model, ids, 32, 1024)) * 1e3
        dense, paged = decode(model, ids, "dense"), decode(model, ids, "paged")
        kernel = decodeattn.serves
        decodeattn.serves = lambda q, k: False  # the torch ops the kernel replaces
        try:
            ops = decode(model, ids, "dense")
        finally:
            decodeattn.serves = kernel
        print(
            f"rep {rep}: HF {hf:.2f} | dense {dense[0]:.2f} ({dense[1]:.3f}) {dense[0] / hf:.2f}x | "
            f"paged {paged[0]:.2f} ({paged[1]:.3f}) {paged[0] / hf:.2f}x | dense on torch ops {ops[0]:.2f} "
            f"({ops[1]:.3f}) {ops[0] / hf:.2f}x"
        )


def quest(context: int, reps: int) -> None:
    spec = ModelSpec("LlamaForCausalLM", 4, 8, 2, 64, torch.float32, torch.device("cpu"))
    variants = {  # quest's default bounds (bfloat16, rounded outward) and exact float32 ones, interleaved
        f"{kind} bounds": Quest(token_budget=context // 8, page_size=16, exact_bounds=exact)
        for kind, exact in (("bfloat16", False), ("float32", True))
    }
    layers = {name: [QuestLayer(3, spec, cfg) for _ in range(4)] for name, cfg in variants.items()}
    ones = torch.ones(1, 1024, dtype=torch.bool)
    for layer in (la for group in layers.values() for la in group):  # 4 layers' buffers each, so a step
        for _ in range(context // 1024):  # reads from memory, not from the caches
            kv_chunk = torch.randn(1, 2, 1024, 64), torch.randn(1, 2, 1024, 64)
            layer.attend(torch.randn(1, 8, 1024, 64), *kv_chunk, ones, 0.125)
    q, k, v, valid = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), ones[:, :1]
    spent: dict[str, dict[str, list[float]]] = {name: {"layer step": []} for name in variants}
    now = [next(iter(variants))]  # the variant being timed
    kernels = ("append_token", "select_pages", "page_attention", "select_and_attend")
    originals = {name: getattr(pageattn, name) for name in kernels}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[now[0]].setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return run

    try:
        for name, fn in originals.items():
            setattr(pageattn, name, timed(name, fn))
        for _ in range(reps * 20):
            for now[0] in variants:
                for layer in layers[now[0]]:
                    t0 = time.perf_counter()
                    layer.attend(q, k, v, valid, 0.125)
                    spent[now[0]]["layer step"].append(time.perf_counter() - t0)
    finally:
        for name, fn in originals.items():
            setattr(pageattn, name, fn)
    print(f"## quest at {context} tokens (budget {context // 8}, 16-token pages): median us per layer step")
    for variant, times in spent.items():
        print(f"{variant}: " + " | ".join(f"{name} {statistics.median(ts) * 1e6:.0f}" for name, ts in times.items()))


def kernel(contexts: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 64, generator=g)
    print("## the split-K kernel alone: median us per call (K/V GB/s)")

    def median_us(n: int, bufs: list[tuple[torch.Tensor, torch.Tensor]], calls: int) -> float:
        times = []
        for i in range(calls + 5):
            k, v = bufs[i % len(bufs)]
            t0 = time.perf_counter()
            decodeattn.decode_attention(q, k, v, 0, n, 0.125)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[5:]) * 1e6

    def kv_pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g)

    small = torch.randn(1, 2, 64, 64, generator=g)
    print(f"fixed cost (one key): {median_us(1, [(small, small)], 2000):.1f} us")
    for n in contexts:
        size = 2 * 2 * n * 64 * 4  # K and V bytes of one layer
        bufs = [kv_pair(n)]
        warm = median_us(n, bufs, 200)
        bufs += [kv_pair(n) for _ in range(max(1, (96 << 20) // size - 1))]
        cold = median_us(n, bufs, 100 if n <= 8192 else 40)
        rates = f"warm {warm:.0f} us ({size / warm / 1e3:.1f} GB/s), cold {cold:.0f} us ({size / cold / 1e3:.1f} GB/s)"
        print(f"{n} keys ({size >> 20} MiB): {rates}")


def prefetch(contexts: list[int], calls: int = 60) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 64, generator=g)
    compiled = jit.attention_kernel
    print("## the kernel's prefetch on / off, from memory: median us per call")

    def dense(n: int) -> Callable[[], Any]:
        k, v = torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g)
        return lambda: decodeattn.decode_attention(q, k, v, 0, n, 0.125)

    def scattered(n: int) -> Callable[[], Any]:
        pages = n // 16
        k, v = torch.randn(2 * pages * 16, 64, generator=g), torch.randn(2 * pages * 16, 64, generator=g)
        sel = [torch.randperm(pages, generator=g)[: pages // 8].sort().values + h * pages for h in range(2)]
        first = (torch.stack(sel) * 16).view(1, 2, -1)
        return lambda: decodeattn.run_attention(q, k, v, first, 16, 16, 0.125)

    for n in contexts:
        for name, make in (("contiguous", dense), ("quest pages", scattered)):
            calls_of = [make(n) for _ in range(max(2, (96 << 20) // (16 * n * 64)))]
            spent: dict[int, list[float]] = {12: [], 0: []}
            for i in range(2 * calls):
                ahead = (12, 0)[(i + i // 2) % 2]  # alternate, and which goes first
                jit.attention_kernel = lambda g_n, d_n, a=ahead: compiled(g_n, d_n, a)  # type: ignore[misc]
                try:
                    t0 = time.perf_counter()
                    calls_of[i % len(calls_of)]()
                    spent[ahead].append(time.perf_counter() - t0)
                finally:
                    jit.attention_kernel = compiled
            on, off = (statistics.median(spent[a][2:]) * 1e6 for a in (12, 0))
            print(f"{n} keys, {name}: prefetch {on:.0f} us, none {off:.0f} us ({off / on:.2f}x)")


Variants = dict[str, tuple[Quest, str]]
"""Quest caches to compare: label -> (config, MEMFUSION_HUGEPAGES while that cache allocates)."""


def _quest_pair(model: Any, ids: torch.Tensor, variants: Variants) -> dict[str, Any]:
    """A quest cache of the benchmark model per variant, each prefilled with ``ids``."""
    name = kv.cache_kwarg(model)
    caches = {}
    for label, (cfg, huge) in variants.items():
        os.environ["MEMFUSION_HUGEPAGES"] = huge
        caches[label] = cache = kv.make_cache(model, cfg)
        with attach(model, cache):
            for s in range(0, ids.shape[1], 1024):
                out = model(ids[:, s : s + 1024], **{name: cache}, use_cache=True, logits_to_keep=1)
    caches["next token"] = out.logits[:, -1].argmax(-1, keepdim=True)
    return caches


def _decode_in_turn(model: Any, caches: dict[str, Any], variants: Variants, context: int, steps: int) -> float:
    """Decode ``steps`` tokens with each cache in turn, step by step, all fed the last cache's greedy
    tokens; returns the mean share of the last layer's selected pages the first two have in common."""
    name, tok, common = kv.cache_kwarg(model), caches.pop("next token"), []
    for i in range(steps):
        pos = torch.tensor([[context + i]])
        for label, cache in caches.items():
            os.environ["MEMFUSION_HUGEPAGES"] = variants[label][1]
            with attach(model, cache):
                out = model(tok, **{name: cache}, position_ids=pos, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        a, b = (c.kv_layers[-1].last_selection for c in list(caches.values())[:2])
        if a is not None and b is not None:
            common.append((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean().item())
    os.environ.pop("MEMFUSION_HUGEPAGES")
    return statistics.mean(common) if common else float("nan")


def _attention_per_layer(caches: dict[str, Any]) -> None:
    for label, cache in caches.items():
        layers = cache.decode_attend_steps[cache.config.dense_layers :]
        per_step = [statistics.mean(t) * 1e3 for t in zip(*layers, strict=True)]
        q1, mid, q3 = statistics.quantiles(per_step, n=4)
        print(f"{label}: {mid:.3f} [{q1:.3f}-{q3:.3f}]")


@torch.inference_mode()
def bounds(context: int, steps: int) -> None:
    model = reference_llama(KVBenchConfig(contexts=(context,)), context + steps)
    ids = torch.randint(0, 1024, (1, context), generator=torch.Generator().manual_seed(1))

    def variants(recall: bool) -> Variants:
        return {
            f"{kind} bounds": (Quest(token_budget=context // 8, exact_bounds=exact, oracle_recall=recall), "1")
            for kind, exact in (("bfloat16", False), ("float32", True))
        }

    caches = _quest_pair(model, ids, variants(False))
    common = _decode_in_turn(model, caches, variants(False), context, steps)
    print(f"## quest's page bounds at {context} tokens, {steps} decode steps each, in turn: attention ms per layer")
    _attention_per_layer(caches)
    print(f"selected pages in common (last layer, same tokens): {common:.1%}")
    caches = _quest_pair(model, ids, variants(True))  # again, with the oracle's recall (a dense pass per step)
    _decode_in_turn(model, caches, variants(True), context, 8)
    recall = {label: cache.stats().extra["quest_recall"] for label, cache in caches.items()}
    print("oracle recall over 8 steps: " + " | ".join(f"{label} {r:.3f}" for label, r in recall.items()))


@torch.inference_mode()
def huge_pages(context: int, steps: int) -> None:
    model = reference_llama(KVBenchConfig(contexts=(context,)), context + steps)
    ids = torch.randint(0, 1024, (1, context), generator=torch.Generator().manual_seed(1))
    cfg = Quest(token_budget=context // 8)
    variants = {"huge pages": (cfg, "1"), "4 KiB pages": (cfg, "0")}
    caches = _quest_pair(model, ids, variants)
    common = _decode_in_turn(model, caches, variants, context, steps)
    print(f"## quest's K/V pages at {context} tokens, {steps} decode steps each, in turn: attention ms per layer")
    _attention_per_layer(caches)
    print(f"selected pages in common (last layer, same tokens): {common:.1%}")


def prefill(context: int) -> None:
    model = reference_llama(KVBenchConfig(contexts=(context,)), context)
    ids = torch.randint(0, 1024, (1, context), generator=torch.Generator().manual_seed(1))
    got = {
        policy: kv.generate(model, ids, policy, max_new_tokens=2, prefill_chunk=1024).prefill_seconds
        for policy in ("dense", "paged")
    }
    print(f"## prefill at {context} tokens: dense {got['dense']:.2f} s, paged {got['paged']:.2f} s")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--ab", type=int, default=4096, help="context of the A/B (0: skip)")
    cli.add_argument("--quest", type=int, default=32768, help="context of the quest breakdown (0: skip)")
    cli.add_argument("--prefill", type=int, default=8192, help="context of the prefill comparison (0: skip)")
    cli.add_argument("--kernel", default="4096,16384,32768", help="contexts of the kernel timings ('': skip)")
    cli.add_argument("--prefetch", default="", help="contexts of the prefetch on / off A/B ('': skip)")
    cli.add_argument("--bounds", type=int, default=0, help="context of quest's bounds A/B (0: skip)")
    cli.add_argument("--hugepages", type=int, default=0, help="context of quest's huge pages A/B (0: skip)")
    cli.add_argument("--steps", type=int, default=64, help="decode steps of each cache in the bounds / pages A/B")
    cli.add_argument("--reps", type=int, default=3)
    args = cli.parse_args()
    if args.kernel:
        kernel([int(c) for c in args.kernel.split(",")])
    if args.prefetch:
        prefetch([int(c) for c in args.prefetch.split(",")])
    if args.bounds:
        bounds(args.bounds, args.steps)
    if args.hugepages:
        huge_pages(args.hugepages, args.steps)
    if args.ab:
        ab(args.ab, args.reps)
    if args.quest:
        quest(args.quest, args.reps)
    if args.prefill:
        prefill(args.prefill)
