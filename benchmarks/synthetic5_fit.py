"""How close Synthetic-5 comes to the data the DKT authors released (read from local files).

    .venv/bin/python benchmarks/synthetic5_fit.py --info naive_c5_q50_s4000_v0_info.txt \\
        --data naive_c5_q50_s4000_v0.csv [--rows 30]

Both files are from ``chrispiech/DeepKnowledgeTracing`` (``data/synthetic/info/`` and
``data/synthetic/``); nothing is downloaded. The info file gives each exercise's correct rate over
the 4,000 students, its concept and its difficulty (tab-separated: rate, s.d., concept,
difficulty); the CSV gives one student per row, 50 answers in order. The first ``--rows``
students of the CSV are compared (the note and the docstring used 30).

For the generator with its defaults and with the old independent-concept parameters, 4,000
students are simulated on the released exercises (their concepts and difficulties) through
:meth:`~memfusion.bench.tasks.tracing.Synthetic5.simulate`, and the script prints: the RMSE of
the item correct rates against the info file, the s.d. of the 50-item score, the correlation of
odd- and even-item scores, and the AUC of a running-mean predictor (log-odds of the student's
smoothed earlier rate plus the item's rate), the latter on ``--rows``-student samples
(mean and s.d. over 20 samples) to match the released rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from memfusion.bench.tasks.tracing import Synthetic5, auc

OLD = Synthetic5(ability_mean=0.0, ability_sd=0.0, concept_sd=1.0, learn_rate=(0.05, 0.25))


def _logit(x: np.ndarray) -> np.ndarray:
    return np.log(x / (1.0 - x))


def stats(answers: np.ndarray, item_rate: np.ndarray) -> dict[str, float]:
    """answers (S, E) in {0, 1}; item_rate (E,) the reference correct rates."""
    earlier = np.cumsum(answers, 1) - answers
    running = (earlier + 1.0) / (np.arange(answers.shape[1]) + 2.0)  # smoothed rate before each step
    score = _logit(running) + _logit(item_rate)
    return {
        "score_sd": float(answers.sum(1).std()),
        "split_half": float(np.corrcoef(answers[:, ::2].sum(1), answers[:, 1::2].sum(1))[0, 1]),
        "running_auc": auc(torch.from_numpy(score[:, 1:].ravel()), torch.from_numpy(answers[:, 1:].ravel())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--info", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    info = np.loadtxt(args.info)
    rate, concept, difficulty = info[:, 0], torch.from_numpy(info[:, 2].astype(np.int64)), torch.from_numpy(info[:, 3])
    theirs = np.loadtxt(args.data, delimiter=",")[: args.rows]
    print(f"released data ({len(theirs)} students):", {k: round(v, 3) for k, v in stats(theirs, rate).items()})
    for name, gen in (("fitted (defaults)", Synthetic5()), ("old", OLD)):
        g = torch.Generator().manual_seed(0)
        answers = gen.simulate(concept, difficulty, 4000, g)[2].numpy().astype(np.float64)
        rmse = float(np.sqrt(((answers.mean(0) - rate) ** 2).mean()))
        whole = stats(answers, rate)
        samples = [stats(answers[i * args.rows : (i + 1) * args.rows], rate)["running_auc"] for i in range(20)]
        print(
            f"{name}: item-rate RMSE {rmse:.3f}, score s.d. {whole['score_sd']:.2f}, "
            f"split-half {whole['split_half']:.3f}, running-mean AUC {np.mean(samples):.3f} "
            f"+- {np.std(samples):.3f} ({args.rows}-student samples)"
        )


if __name__ == "__main__":
    main()
