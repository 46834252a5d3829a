"""The training recipes: ``RECIPES[(model, task)]`` -> :class:`Recipe`, one per reproduction of the issue.

Families (one file each): :mod:`.sequence` (NTM / DNC / LSTM on algorithmic and graph tasks),
:mod:`.fewshot` (MANN / LSTM episodes), :mod:`.tracing` (DKVMN / DKT), :mod:`.capacity` (modern vs
classical Hopfield, evaluation only) and :mod:`.passkey` (the fusion layer). The defaults are the
settings of the reproduced-results runs (``benchmarks/neural_results.py``); every one can be
overridden from the command line (``memfusion train MODEL --task TASK --steps N -o key=value``).
"""

from __future__ import annotations

from memfusion.bench.recipes.base import Recipe, options_dict, parse_options, run_recipe
from memfusion.bench.recipes.registry import RECIPES, find_recipe, models, tasks_of

__all__ = ["RECIPES", "Recipe", "find_recipe", "models", "options_dict", "parse_options", "run_recipe", "tasks_of"]
