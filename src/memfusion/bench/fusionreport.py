"""The report of a fusion run: ``report.md`` and a self-contained ``report.html`` (PNG plots embedded).

Built from the rows of ``fusion.jsonl`` alone (:mod:`memfusion.bench.fusion`), so a partial run gets
a report of what finished. Contents: a header (model, seed, budget, machine, versions); one table
per length and one over all lengths (route: strategy taken, budget, accuracy with its Wilson 95%
interval, store-question and context-question accuracy, KV peak MB median (p90), decode ms/token,
total ms, retrieval rate, share within budget, errors); per length, whether ``auto`` is on the
Pareto front of accuracy vs KV memory; plots: accuracy vs KV MB per length (front drawn, auto
highlighted), total latency vs length and KV MB vs length (one line per route).

Plots use matplotlib's object API (``Figure``, saved by the Agg canvas): no global backend is set.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memfusion.bench import fusion, fusionsummary
from memfusion.bench.fusionsummary import RouteSummary
from memfusion.bench.metrics import Rate

COLUMNS = [
    "route",
    "strategy taken (count)",
    "budget MB",
    "accuracy [95% CI] (n)",
    "store-q accuracy",
    "context-q accuracy",
    "KV peak MB median (p90)",
    "decode ms/token",
    "total ms",
    "retrieval rate",
    "within budget",
    "errors",
]


# --- tables -----------------------------------------------------------------------------------


def _rate(r: Rate | None, n: bool = True) -> str:
    if r is None:
        return "-"
    return f"{r.value:.2f} [{r.low:.2f}, {r.high:.2f}]" + (f" (n={r.n})" if n else "")


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table_rows(summaries: Sequence[RouteSummary], length: int | None) -> list[list[str]]:
    """The table of one length (None: all lengths), one row (strings) per route."""
    rows = []
    for s in summaries:
        if s.length != length:
            continue
        kv = "-" if s.kv_peak_mb is None else f"{s.kv_peak_mb:.3f} ({_num(s.kv_peak_mb_p90, '.3f')})"
        rows.append(
            [
                s.route,
                ", ".join(f"{k} ({v})" for k, v in s.strategies.items()) or "-",
                "none" if s.budget_mb is None else f"{s.budget_mb:g}",
                _rate(s.accuracy),
                _rate(s.by_kind.get("store"), n=False),
                _rate(s.by_kind.get("context"), n=False),
                kv,
                _num(s.decode_ms_per_token, ".2f"),
                _num(s.total_ms, ".1f"),
                _num(s.retrieval_rate, ".2f"),
                _num(s.within_budget, ".2f"),
                str(s.errors),
            ]
        )
    return rows


def front_lines(summaries: Sequence[RouteSummary]) -> dict[int, str]:
    """Per length, one line: the Pareto front and whether ``auto`` is on it."""
    on = fusionsummary.auto_on_front(summaries)
    out = {}
    for n in sorted({s.length for s in summaries if s.length is not None}):
        front = sorted(fusionsummary.front_of(summaries, n))
        verdict = "auto: not run" if n not in on else f"auto is {'ON' if on[n] else 'NOT on'} the Pareto front"
        out[n] = f"{verdict} (accuracy vs median KV peak MB; front: {', '.join(front) or '-'})"
    return out


def header_lines(
    header: dict[str, Any], cfg: fusion.FusionConfig, rows: Sequence[dict[str, Any]]
) -> list[tuple[str, str]]:
    """(label, value) pairs of the report's header."""
    model = str(header.get("model", cfg.model))
    if header.get("model_random"):
        model += " (RANDOM WEIGHTS: accuracy ~0 is expected; this run checks the harness, not a model)"
    bounded = [r for r in cfg.routes if cfg.budget_for(r) is not None]
    unbounded = [r for r in cfg.routes if cfg.budget_for(r) is None]
    budget = f"{cfg.memory_budget_mb:g} MB (2^20 bytes) for {', '.join(bounded) or '-'}"
    if unbounded:
        budget += f"; no budget for the unbounded fixed routes {', '.join(unbounded)} (they cannot be sized)"
    errors = sum(r.get("error") is not None for r in rows)
    return [
        ("model", model),
        ("model info", ", ".join(f"{k} {v}" for k, v in header.get("model_info", {}).items()) or "-"),
        ("seed", str(header.get("seed", cfg.seed))),
        ("memory budget", budget),
        (
            "questions",
            f"lengths {', '.join(map(str, cfg.lengths))}; {cfg.samples} per kind (store, context) per length; "
            f"{cfg.n_facts} facts per namespace; {cfg.max_new_tokens} new tokens; prefill chunk {cfg.prefill_chunk}",
        ),
        ("machine", ", ".join(f"{k} {v}" for k, v in header.get("machine", {}).items()) or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in header.get("versions", {}).items()) or "-"),
        ("started", str(header.get("started", "?"))),
        ("rows", f"{len(rows)} samples, {errors} failed"),
    ]


EXPLAIN = (
    "Accuracy: exact match of the generated value, with its Wilson 95% interval. store-q: the answer is only "
    "in the store; context-q: only in the document. KV figures are measured peaks (KVStats, the prefill chunk "
    "in flight included). decode ms/token: decode time per decode step, median over samples; total ms: "
    "retrieval + prefill + decode, median. retrieval rate: share of samples whose prompt got retrieved facts."
)


# --- plots ------------------------------------------------------------------------------------


def _figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")


def plot_pareto(summaries: Sequence[RouteSummary], length: int, path: Path) -> Path:
    """Accuracy (Wilson 95% CI) vs median KV peak MB at ``length``; the Pareto front as a step
    line; ``auto`` drawn as a red star."""
    pts = [
        (s.route, s.accuracy, s.kv_peak_mb)
        for s in summaries
        if s.length == length and s.accuracy is not None and s.kv_peak_mb is not None
    ]
    front = fusionsummary.front_of(summaries, length)
    fig = _figure()
    ax = fig.subplots()
    for k, (route, acc, mem) in enumerate(pts):
        auto = route == "auto"
        ax.errorbar(
            [mem],
            [acc.value],
            yerr=[[acc.value - acc.low], [acc.high - acc.value]],
            fmt="*" if auto else "o",
            markersize=14 if auto else 7,
            color="red" if auto else ("tab:blue" if route in front else "tab:gray"),
            capsize=3,
        )
        # staggered labels: routes often share a point (same policy, same budget)
        ax.annotate(route, (mem, acc.value), textcoords="offset points", xytext=(6, 6 + 11 * (k % 3)), fontsize=8)
    on = sorted((mem, acc.value) for route, acc, mem in pts if route in front)
    if on:  # the staircase: each front point covers every larger memory up to the next one
        right = max(mem for _, _, mem in pts)
        xs, ys = [x for x, _ in on] + [right], [y for _, y in on] + [on[-1][1]]
        ax.step(xs, ys, where="post", color="tab:blue", alpha=0.6, label="Pareto front")
        ax.plot(xs[:-1], ys[:-1], "o", mfc="none", mec="tab:blue", markersize=16)
        ax.legend(fontsize="small")
    ax.set_xlabel("KV peak MB (median, measured)")
    ax.set_ylabel("accuracy (Wilson 95% CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"accuracy vs KV memory at {length} tokens (auto: red star)")
    fig.savefig(path, format="png")
    return path


def _vs_length(
    summaries: Sequence[RouteSummary], pick: Any, ylabel: str, title: str, path: Path, budget: float | None
) -> Path:
    fig = _figure()
    ax = fig.subplots()
    routes = list(dict.fromkeys(s.route for s in summaries))
    lengths = sorted({s.length for s in summaries if s.length is not None})
    for route in routes:
        xy = [(s.length, pick(s)) for s in summaries if s.route == route and s.length is not None]
        xy = [(x, y) for x, y in xy if y is not None]
        if xy:
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="*" if route == "auto" else "o", label=route)
    if budget is not None:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:g} MB")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if lengths:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.legend(fontsize="small", ncol=2)
    fig.savefig(path, format="png")
    return path


def plots(summaries: Sequence[RouteSummary], cfg: fusion.FusionConfig, out: Path) -> dict[str, Path]:
    """Every plot of the report, written into ``out``; name -> path."""
    files = {}
    for n in sorted({s.length for s in summaries if s.length is not None}):
        files[f"pareto_{n}"] = plot_pareto(summaries, n, out / f"fusion_pareto_{n}.png")
    files["latency_vs_length"] = _vs_length(
        summaries,
        lambda s: s.total_ms,
        "total ms per request (median)",
        "total latency vs context length",
        out / "fusion_latency_vs_length.png",
        None,
    )
    files["kv_vs_length"] = _vs_length(
        summaries,
        lambda s: s.kv_peak_mb,
        "KV peak MB (median, measured)",
        "KV memory vs context length",
        out / "fusion_kv_vs_length.png",
        cfg.memory_budget_mb,
    )
    return files


# --- documents --------------------------------------------------------------------------------


def _md_table(rows: list[list[str]]) -> list[str]:
    esc = [[x.replace("|", "\\|").replace("\n", " ") for x in row] for row in rows]
    return ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS), *("| " + " | ".join(r) + " |" for r in esc)]


def _html_table(rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in COLUMNS)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _sections(summaries: Sequence[RouteSummary]) -> list[tuple[str, list[list[str]], str | None]]:
    """(title, table rows, Pareto line) per length, then all lengths."""
    lines = front_lines(summaries)
    out: list[tuple[str, list[list[str]], str | None]] = [
        (f"{n} tokens", table_rows(summaries, n), lines.get(n))
        for n in sorted({s.length for s in summaries if s.length is not None})
    ]
    if summaries:
        out.append(("all lengths", table_rows(summaries, None), None))
    return out


def markdown(head: list[tuple[str, str]], summaries: Sequence[RouteSummary], images: dict[str, Path]) -> str:
    """The Markdown report; images are linked by file name (they sit beside report.md)."""
    lines = ["# memfusion fusion benchmark: routes on accuracy, KV memory and latency", ""]
    lines += [f"- **{k}**: {v}" for k, v in head]
    lines += ["", EXPLAIN, ""]
    for title, rows, front in _sections(summaries):
        lines += [f"## {title}", "", *_md_table(rows), ""]
        if front:
            lines += [front, ""]
    lines += ["## plots", "", *(f"![{name}]({path.name})" for name, path in images.items())]
    return "\n".join(lines) + "\n"


def html_report(head: list[tuple[str, str]], summaries: Sequence[RouteSummary], images: dict[str, Path]) -> str:
    """One HTML file with no external reference: styles inline, PNGs as base64 data URIs."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>memfusion fusion benchmark</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}th{background:#eee}</style></head><body>",
        "<h1>memfusion fusion benchmark: routes on accuracy, KV memory and latency</h1><ul>",
        *(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in head),
        f"</ul><p>{html.escape(EXPLAIN)}</p>",
    ]
    for title, rows, front in _sections(summaries):
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(rows)]
        if front:
            parts.append(f"<p>{html.escape(front)}</p>")
    parts.append("<h2>plots</h2>")
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(
    rows: Sequence[dict[str, Any]], cfg: fusion.FusionConfig, out: str | Path, header: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs of ``rows`` into ``out``. ``header``: the
    results file's first line (machine, versions, model); taken from this machine and ``cfg`` when
    None. Returns name -> path (``md``, ``html``, each plot)."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    head = header_lines(header if header is not None else fusion.header(cfg), cfg, rows)
    summaries = fusionsummary.summarize(rows)
    images = plots(summaries, cfg, directory)
    md = directory / "report.md"
    md.write_text(markdown(head, summaries, images), encoding="utf-8")
    page = directory / "report.html"
    page.write_text(html_report(head, summaries, images), encoding="utf-8")
    return {"md": md, "html": page, **images}
