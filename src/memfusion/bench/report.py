"""Reports of a KV benchmark run: Markdown (with the machine header), JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from memfusion.bench.kvperf import KVBenchReport, PolicyRow

MIB = 1024 * 1024


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def headline(report: KVBenchReport) -> list[str]:
    """The issue's targets, each as a ratio measured in this run."""
    lines = []
    by = {(r.policy, r.context): r for r in report.rows}
    for ctx in report.config.contexts:
        hf = report.baseline[ctx].median
        for p in ("dense", "paged"):
            r = by.get((p, ctx))
            if r:
                lines.append(
                    f"- {ctx} tokens: `{p}` decode {r.decode_ms.median:.2f} ms/token vs HF DynamicCache "
                    f"{hf:.2f} ms/token -> {r.decode_ratio:.2f}x (target <= 1.0x)"
                )
        dense, quest = by.get(("dense", ctx)), by.get(("quest", ctx))
        if dense and quest and dense.attend_ms_layer and quest.attend_ms_layer:
            lines.append(
                f"- {ctx} tokens: `quest` (budget {quest.params['token_budget']}) attention per compressed "
                f"layer {quest.attend_ms_layer:.2f} ms vs dense {dense.attend_ms_layer:.2f} ms -> "
                f"{dense.attend_ms_layer / quest.attend_ms_layer:.2f}x faster (target >= 3x at 32K)"
            )
        for r in (
            x for x in report.rows if x.context == ctx and x.policy in ("window", "snapkv", "h2o", "quant", "tiered")
        ):
            lines.append(
                f"- {ctx} tokens: `{r.policy}` peak KV {r.peak_bytes / MIB:.2f} MiB, analytic "
                f"{r.analytic_bytes / MIB:.2f} MiB -> peak/analytic {r.peak_bytes / r.analytic_bytes:.3f} "
                f"(target <= 1.05)"
            )
        q = by.get(("quant", ctx))
        if dense and q:
            lines.append(
                f"- {ctx} tokens: `quant` 4-bit KV bytes {_ratio(dense.bytes_resident, q.bytes_resident)} "
                "smaller than dense (target >= 3.5x)"
            )
        for p in ("dense", "paged"):
            r = by.get((p, ctx))
            if r and r.kv_read_gbps:
                bw = r.stream_copy_gbps or report.stream_copy_gbps
                lines.append(
                    f"- {ctx} tokens: `{p}` decode attention reads KV at {r.kv_read_gbps:.1f} GB/s = "
                    f"{r.kv_read_gbps / bw:.0%} of STREAM copy {bw:.1f} GB/s measured just before it; "
                    f"{r.kv_read_gbps / report.stream_copy_gbps:.0%} of the run's first measurement "
                    f"{report.stream_copy_gbps:.1f} GB/s (target >= 50%)"
                )
    return lines


def _row(r: PolicyRow) -> str:
    sel = f"{r.page_selection:.3f}" if r.page_selection is not None else "-"
    hits = f"{r.prefix_hit_rate:.2f}" if r.prefix_hit_rate is not None else "-"
    layer = f"{r.attend_ms_layer:.3f}" if r.attend_ms_layer is not None else "-"
    params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "-"
    return (
        f"| {r.context} | {r.policy} | {params} | {r.prefill_s:.2f} | {r.decode_ms} | {r.decode_ratio:.2f} | "
        f"{r.attend_ms:.2f} | {layer} | {r.tokens_resident} | {r.bytes_resident / MIB:.2f} | "
        f"{r.peak_bytes / MIB:.2f} | {r.analytic_bytes / MIB:.2f} | {r.bytes_offloaded / MIB:.2f} | {sel} | {hits} |"
    )


def markdown(report: KVBenchReport) -> str:
    c, m = report.config, report.machine
    out = [
        "# memfusion KV-policy benchmark",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads, {m['device']}; python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}. STREAM-style copy bandwidth: {report.stream_copy_gbps:.1f} GB/s.",
        f"Model: random LlamaForCausalLM, {c.layers} layers, hidden {c.hidden}, {c.heads} query heads, "
        f"{c.kv_heads} KV heads, fp32, batch 1; {c.new_tokens} new tokens per run; seed {c.seed}.",
        "Decode times are medians [p25-p75] over decode steps in ms/token; ratios against transformers' "
        "DynamicCache loop measured in the same run. Attention = the policy's store+select+attend time per decode "
        "step, median over steps (all layers; per layer over the layers the policy compresses); the JSON keeps "
        "the mean as attend_ms_mean.",
        "",
        "## Targets",
        "",
        *headline(report),
        "",
        "## All figures",
        "",
        "| context | policy | params | prefill s | decode ms/token | vs HF | attn ms/step | attn ms/layer | "
        "tokens resident | KV MiB | peak MiB | analytic MiB | offloaded MiB | pages sel. | prefix hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ctx in c.contexts:
        out.append(
            f"| {ctx} | **HF DynamicCache** | - | - | {report.baseline[ctx]} | 1.00 | - | - | - | - | - | - | - "
            "| - | - |"
        )
        out.extend(_row(r) for r in report.rows if r.context == ctx)
    return "\n".join(out) + "\n"


def plot(report: KVBenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ctxs = list(report.config.contexts)
    ax1.plot(ctxs, [report.baseline[c].median for c in ctxs], "k--o", label="HF DynamicCache")
    for p in report.config.policies:
        rows = [r for r in report.rows if r.policy == p]
        ax1.plot([r.context for r in rows], [r.decode_ms.median for r in rows], "-o", label=p)
        ax2.plot([r.context for r in rows], [r.peak_bytes / MIB for r in rows], "-o", label=p)
    ax1.set(xlabel="context (tokens)", ylabel="decode ms/token (median)", xscale="log", title="Decode latency")
    ax2.set(xlabel="context (tokens)", ylabel="peak KV MiB", xscale="log", yscale="log", title="Peak KV memory")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: KVBenchReport, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``stem.md``, ``stem.json`` and ``stem.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    paths["md"].write_text(markdown(report))
    paths["json"].write_text(json.dumps(report.to_json(), indent=2, default=str))
    plot(report, paths["png"])
    return paths
