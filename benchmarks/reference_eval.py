"""The reference model's accuracy with dense attention: the issue's targets and how it degrades.

    .venv/bin/python benchmarks/reference_eval.py [--model DIR] [--samples 50] [--out FILE.json]

Greedy decoding, one prompt at a time, the benchmark's task generators and seeds (seed 0, the
samples ``memfusion bench`` draws), exact match, with 95% Wilson intervals. Rows: NIAH-single
(essay haystack, 7-digit values: the issue's target, >= 0.95 at 2K and >= 0.90 at 4K) at 1K-8K,
NIAH-single in repeated filler with 5-digit values, multi-key needles, the key-value lookup and
facts-in-text (the engine's format; with 4 facts, and with the one fact asked about). Without
``--model``, the weights shipped with the package.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.progress import Progress

from memfusion.bench.metrics import wilson
from memfusion.bench.tasks.ruler import FactsInText, KvLookup, NiahMultikey, NiahSingle
from memfusion.models.reference import load
from memfusion.models.reference_train import evaluate

ROWS = [
    ("niah_single (essay, 7 digits)", NiahSingle(), (1024, 2048, 4096, 8192)),
    ("niah_single (filler, 5 digits)", NiahSingle(haystack="noise", value_digits=5), (2048, 4096)),
    ("niah_multikey (essay, 3 distractors)", NiahMultikey(), (2048, 4096)),
    ("kv_lookup", KvLookup(), (1024, 2048)),
    ("facts_in_text", FactsInText(), (1024, 2048, 4096)),
    ("facts_in_text (1 fact)", FactsInText(n_facts=1), (1024, 2048)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the shipped weights)")
    parser.add_argument("--samples", type=int, default=50, help="prompts per row and length (8K: half)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--only", default=None, help="only the rows whose task name contains this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    rows = [row for row in ROWS if args.only is None or args.only in row[0]]
    cells = [(name, task, length) for name, task, lengths in rows for length in lengths]
    results = []
    with Progress() as bar:
        job = bar.add_task("evaluating", total=len(cells))
        for name, task, length in cells:
            n = args.samples // 2 if length > 4096 else args.samples
            bar.update(job, description=f"{name} @ {length}")
            start = time.perf_counter()
            score = evaluate(model, tok, task, length, n, seed=0)
            low, high = wilson(round(score * n), n)
            results.append({"task": name, "length": length, "n": n, "exact": score, "low": low, "high": high,
                            "seconds": round(time.perf_counter() - start, 1)})
            bar.advance(job)
    print("| task | length | exact match | 95% interval | n |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['length']} | {r['exact']:.2f} | {r['low']:.2f}-{r['high']:.2f} | {r['n']} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"model": str(args.model or "shipped"), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
