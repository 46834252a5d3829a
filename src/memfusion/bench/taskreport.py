"""The report of a task run: ``report.md`` and a self-contained ``report.html`` (PNG plots embedded).

Built from a ``results.jsonl`` alone (:mod:`memfusion.bench.runner`), so a partial or interrupted
run still gets a report of what finished. Contents: a header (model, whether its weights are
random, suite, seed, device, batch, machine, versions); one table per task (policy x budget x
length: accuracy with its Wilson 95% interval and count, exact KV MB resident and peak, decode
ms/token median and IQR, generated tokens/s, sparse page recall); retention by distance to the
question; plots: accuracy vs KV budget (one line per policy), KV memory vs context length, decode
latency vs context length, and a needle depth x length accuracy heatmap per policy.

Plots use matplotlib's object API (``Figure`` + Agg canvas): no global backend is set.
"""

from __future__ import annotations

import base64
import html
import itertools
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memfusion.bench import metrics
from memfusion.bench.runner import read_results, results_path

MB = 1e6
DEPTH_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Needle depth bins of the heatmaps (0 = the context starts with the needle, 1 = right before the question)."""


# --- data -------------------------------------------------------------------------------------


def _budget_label(budget: float | None) -> str:
    return "all" if budget is None else f"{budget:g}"


def _series(cell: dict[str, Any]) -> str:
    """A policy at one budget: the line of a plot."""
    b = cell["budget"]
    return cell["policy"] if b is None else f"{cell['policy']}@{b:g}"


def _ok(cells: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cells if c["status"] == "ok"]


def _order(cell: dict[str, Any]) -> tuple[str, float, int]:
    return (cell["policy"], -1.0 if cell["budget"] is None else cell["budget"], cell["length"])


def _fmt_rate(r: dict[str, Any] | metrics.Rate | None) -> str:
    if r is None:
        return "-"
    if isinstance(r, metrics.Rate):
        r = {"value": r.value, "low": r.low, "high": r.high, "n": r.n}
    return f"{r['value']:.2f} [{r['low']:.2f}, {r['high']:.2f}] (n={r['n']})"


def _opt(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def task_rows(cells: Iterable[dict[str, Any]]) -> dict[str, list[list[str]]]:
    """Per task, the table rows (strings) in policy, budget, length order."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_task[c["task"]].append(c)
    out: dict[str, list[list[str]]] = {}
    for task in sorted(by_task):
        rows = []
        for c in sorted(by_task[task], key=_order):
            head = [c["policy"], _budget_label(c["budget"]), str(c["length"])]
            if c["status"] != "ok":
                rows.append([*head, f"FAILED: {c['error']}", "-", "-", "-", "-", "-"])
                continue
            m = c["metrics"]
            dec = m["latency_ms"]["decode"]
            rows.append(
                [
                    *head,
                    _fmt_rate(m["accuracy"]),
                    f"{m['kv']['resident']['mean'] / MB:.3f}",
                    f"{m['kv']['peak_max'] / MB:.3f}",
                    "-" if dec is None else f"{dec['median']:.2f} [{dec['p25']:.2f}-{dec['p75']:.2f}] (n={dec['n']})",
                    f"{m['throughput']['tokens_per_s']:.1f}",
                    _opt(m.get("page_recall"), ".2f"),
                ]
            )
        out[task] = rows
    return out


COLUMNS = [
    "policy",
    "budget",
    "length",
    "accuracy [95% CI] (n)",
    "KV MB resident",
    "KV MB peak",
    "decode ms/token median [IQR] (n)",
    "tokens/s",
    "page recall",
]


def _pooled(cells: Iterable[dict[str, Any]], pick: Any = None) -> list[float]:
    return [s["score"] for c in cells for s in c["samples"] if pick is None or pick(s)]


def retention_rows(cells: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Accuracy by distance to the question (quartiles of the longest length), per policy, needle tasks only."""
    needle = [c for c in _ok(cells) if any(s["has_needle"] for s in c["samples"])]
    if not needle:
        return [], []
    top = max(max(s["distance"] for s in c["samples"]) for c in needle)
    edges = [0.0, top / 4, top / 2, 3 * top / 4, float(top)] if top > 0 else [0.0, 1.0]
    head = ["policy"] + [f"{a:.0f}-{b:.0f}" for a, b in itertools.pairwise(edges)]
    rows = []
    for policy in sorted({c["policy"] for c in needle}):
        samples = [s for c in needle if c["policy"] == policy for s in c["samples"] if s["has_needle"]]
        bins = metrics.retention([s["score"] for s in samples], [s["distance"] for s in samples], edges)
        rows.append([policy] + [_fmt_rate(b.accuracy) for b in bins])
    return head, rows


# --- plots ------------------------------------------------------------------------------------


def _figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")


def plot_accuracy_vs_budget(cells: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy pooled over tasks and lengths vs the KV budget fraction; one line per policy."""
    fig = _figure()
    ax = fig.subplots()
    by: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in _ok(cells):
        by[c["policy"]][1.0 if c["budget"] is None else c["budget"]].extend(_pooled([c]))
    for policy in sorted(by):
        xs = sorted(by[policy])
        rates = [metrics.rate(by[policy][x]) for x in xs]
        ys = [r.value for r in rates]
        err = [[r.value - r.low for r in rates], [r.high - r.value for r in rates]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=policy)
    ax.set_xlabel("KV budget (fraction of the context; 1 = every token kept)")
    ax.set_ylabel("accuracy (Wilson 95% CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("accuracy vs KV budget")
    if by:
        ax.legend(fontsize="small")
    fig.savefig(path, format="png")
    return path


def _line_plot(cells: list[dict[str, Any]], value: Any, ylabel: str, title: str, path: Path) -> Path:
    fig = _figure()
    ax = fig.subplots()
    by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in _ok(cells):
        v = value(c)
        if v is not None:
            by[_series(c)][c["length"]].append(v)
    for name in sorted(by):
        xs = sorted(by[name])
        ax.plot(xs, [sum(by[name][x]) / len(by[name][x]) for x in xs], marker="o", label=name)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if by:
        lengths = sorted({n for series in by.values() for n in series})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.legend(fontsize="small", ncol=2)
    fig.savefig(path, format="png")
    return path


def plot_depth_heatmap(cells: list[dict[str, Any]], policy: str, path: Path) -> Path:
    """Accuracy of ``policy`` by needle depth bin (rows) x context length (columns), needle samples only."""
    import numpy as np

    ok = [c for c in _ok(cells) if c["policy"] == policy]
    lengths = sorted({c["length"] for c in ok})
    grid = np.full((len(DEPTH_EDGES) - 1, max(1, len(lengths))), np.nan)  # (depth bins, lengths)
    counts = np.zeros_like(grid, dtype=int)
    for j, n in enumerate(lengths):
        samples = [s for c in ok if c["length"] == n for s in c["samples"] if s["has_needle"]]
        if not samples:
            continue
        bins = metrics.retention([s["score"] for s in samples], [s["depth"] for s in samples], DEPTH_EDGES)
        for i, b in enumerate(bins):
            if b.accuracy is not None:
                grid[i, j], counts[i, j] = b.accuracy.value, b.accuracy.n
    fig = _figure()
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if counts[i, j]:
                colour = "k" if grid[i, j] > 0.6 else "w"  # readable on viridis' yellow and purple ends
                ax.text(j, i, f"{grid[i, j]:.2f}\nn={counts[i, j]}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(DEPTH_EDGES) - 1), [f"{a:.1f}-{b:.1f}" for a, b in itertools.pairwise(DEPTH_EDGES)])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{policy}: accuracy by needle depth x length (all budgets)")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.savefig(path, format="png")
    return path


def _decode_median(cell: dict[str, Any]) -> float | None:
    d = cell["metrics"]["latency_ms"]["decode"]
    return None if d is None else float(d["median"])


def plots(cells: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """Every plot of the report, written into ``out``; name -> path."""
    files = {
        "accuracy_vs_budget": plot_accuracy_vs_budget(cells, out / "accuracy_vs_budget.png"),
        "kv_vs_length": _line_plot(
            cells,
            lambda c: c["metrics"]["kv"]["resident"]["mean"] / MB,
            "KV MB resident (exact, mean per request)",
            "KV memory vs context length",
            out / "kv_vs_length.png",
        ),
        "latency_vs_length": _line_plot(
            cells,
            lambda c: (
                None if c["metrics"]["latency_ms"]["decode"] is None else c["metrics"]["latency_ms"]["decode"]["median"]
            ),
            "decode ms/token (median)",
            "decode latency vs context length",
            out / "latency_vs_length.png",
        ),
    }
    for policy in sorted({c["policy"] for c in _ok(cells)}):
        files[f"heatmap_{policy}"] = plot_depth_heatmap(cells, policy, out / f"heatmap_{policy}.png")
    return files


# --- documents ------------------------------------------------------------------------------


def header_lines(header: dict[str, Any], cells: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) pairs of the report's header."""
    info = header.get("model_info", {})
    model = header["model"]
    if header.get("model_random"):
        model += " (RANDOM WEIGHTS: accuracy ~0 is expected; this run checks the harness, not a model)"
    failed = sum(c["status"] != "ok" for c in cells)
    suite = header["suite"]
    return [
        ("model", model),
        ("model info", ", ".join(f"{k} {v}" for k, v in info.items())),
        ("suite", f"{suite['name']}: {suite['description']}"),
        ("seed", str(header["seed"])),
        ("device / batch", f"{header['device']} / {header['batch']}"),
        ("machine", ", ".join(f"{k} {v}" for k, v in header["machine"].items())),
        ("versions", ", ".join(f"{k} {v}" for k, v in header["versions"].items())),
        ("started", header.get("started", "?")),
        ("cells", f"{len(cells)} finished, {failed} failed"),
    ]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[x.replace("|", "\\|").replace("\n", " ") for x in row] for row in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in esc)]


def markdown(header: dict[str, Any], cells: list[dict[str, Any]], images: dict[str, Path]) -> str:
    """The Markdown report; images are linked by file name (they sit beside report.md)."""
    lines = ["# memfusion task benchmark", ""]
    lines += [f"- **{k}**: {v}" for k, v in header_lines(header, cells)]
    lines += ["", "Accuracy: mean score with its Wilson 95% interval; KV bytes are exact (KVStats); decode is"]
    lines += ["per generated token; tokens/s counts every generated token over prefill + decode time.", ""]
    for task, rows in task_rows(cells).items():
        lines += [f"## {task}", "", *_md_table(COLUMNS, rows), ""]
    head, rows = retention_rows(cells)
    if rows:
        lines += ["## retention by distance to the question (tokens), needle tasks", "", *_md_table(head, rows), ""]
    lines += ["## plots", ""]
    lines += [f"![{name}]({path.name})" for name, path in images.items()]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def html_report(header: dict[str, Any], cells: list[dict[str, Any]], images: dict[str, Path]) -> str:
    """One HTML file with no external reference: styles inline, PNGs as base64 data URIs."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>memfusion task benchmark</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}th{background:#eee}</style></head><body>",
        "<h1>memfusion task benchmark</h1><ul>",
        *(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in header_lines(header, cells)),
        "</ul>",
    ]
    for task, rows in task_rows(cells).items():
        parts += [f"<h2>{html.escape(task)}</h2>", _html_table(COLUMNS, rows)]
    head, rows = retention_rows(cells)
    if rows:
        parts += ["<h2>retention by distance to the question (tokens), needle tasks</h2>", _html_table(head, rows)]
    parts.append("<h2>plots</h2>")
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build(results: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs for a results file (or its directory) into
    ``out`` (default: the results' directory). Returns name -> path (``md``, ``html``, each plot)."""
    path = results_path(results)
    header, by_key = read_results(path)
    cells = list(by_key.values())
    directory = Path(out) if out is not None else path.parent
    directory.mkdir(parents=True, exist_ok=True)
    images = plots(cells, directory)
    md = directory / "report.md"
    md.write_text(markdown(header, cells, images), encoding="utf-8")
    page = directory / "report.html"
    page.write_text(html_report(header, cells, images), encoding="utf-8")
    return {"md": md, "html": page, **images}
