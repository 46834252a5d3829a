"""What a training recipe is: a model on a task with its defaults, its options, and how to run it.

A :class:`Recipe` names ``(model, task)`` and holds:

- ``setup(options, seed, device) -> Problem``: builds the model and the task (the data, the
  evaluation set) as a :class:`~memfusion.bench.train.Problem` that :func:`~memfusion.bench.train.train`
  runs; or, for a recipe with its own loop (``fusion passkey``), ``run(options, config, on_eval)``;
- ``options``: a frozen dataclass *instance* holding the recipe's defaults; its fields are the
  ``--option KEY=VALUE`` keys (strings are converted once, by :func:`parse_options`, from the field types);
- the training defaults: steps, batch size, learning rate and its schedule, evaluation interval,
  optimizer, clipping;
- what the issue asks of it (``target``) and the published figure (``paper``), for the results table.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from memfusion.bench.train import OptimizerName, Problem, Schedule, TrainConfig, TrainResult, train
from memfusion.errors import InvalidInput

EVAL_SEED_OFFSET = 1_000_003
"""Evaluation sets are drawn from ``seed + EVAL_SEED_OFFSET``, a stream training never uses."""


def need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


def eval_generator(seed: int) -> torch.Generator:
    """The generator of a run's fixed evaluation set."""
    return torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)


Setup = Callable[[Any, int, torch.device], Problem]
Runner = Callable[[Any, TrainConfig, Callable[[dict[str, Any]], None] | None], TrainResult]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A model trained on a task; see the module docstring. Exactly one of ``setup`` / ``run`` is set."""

    model: str
    task: str
    summary: str
    options: Any
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    setup: Setup | None = None
    run: Runner | None = None
    optimizer: OptimizerName = OptimizerName.ADAM
    schedule: Schedule = Schedule.CONSTANT
    grad_clip: float | None = 10.0
    weight_decay: float = 0.0
    target: str = ""
    paper: str = ""

    def __post_init__(self) -> None:
        need((self.setup is None) != (self.run is None), f"recipe {self.name}: give exactly one of setup and run")
        need(dataclasses.is_dataclass(self.options), f"recipe {self.name}: options must be a dataclass instance")

    @property
    def name(self) -> str:
        return f"{self.model} {self.task}"

    def config(self, **overrides: Any) -> TrainConfig:
        """The recipe's training defaults as a :class:`TrainConfig`, with ``overrides`` (None values ignored)."""
        values: dict[str, Any] = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "eval_every": self.eval_every,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "grad_clip": self.grad_clip,
            "weight_decay": self.weight_decay,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig(**values)

    def with_options(self, values: Mapping[str, str]) -> Any:
        """The recipe's options with ``values`` (strings, as from the command line) applied."""
        return parse_options(self.options, values, self.name)


def options_dict(options: Any) -> dict[str, Any]:
    """The options as JSON-able values (paths as strings, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        v = getattr(options, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of the type ``hint`` (int, float, bool, str, Path, tuple[int, ...], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        return _convert(text, args[0], key)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_convert(x.strip(), item, key) for x in text.split(",") if x.strip())
    if hint is bool:
        low = text.strip().lower()
        need(low in _TRUE | _FALSE, f"option {key} must be true or false, got {text!r}")
        return low in _TRUE
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise InvalidInput(f"option {key} must be an integer, got {text!r}") from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise InvalidInput(f"option {key} must be a number, got {text!r}") from None
        need(math.isfinite(value), f"option {key} must be finite, got {text!r}")
        return value
    if hint is Path:
        return Path(text)
    return text


def parse_options(defaults: Any, values: Mapping[str, str], recipe: str = "this recipe") -> Any:
    """``defaults`` (an options dataclass instance) with ``values`` converted from strings and applied;
    unknown keys and bad values raise :class:`InvalidInput` naming the valid keys and types."""
    cls = type(defaults)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    need(
        not unknown,
        f"unknown option(s) {', '.join(unknown)} for {recipe}; valid: "
        + (", ".join(f"{n} (default {getattr(defaults, n)!r})" for n in names) or "none"),
    )
    changes = {k: _convert(v, hints[k], k) for k, v in values.items()}
    try:
        return dataclasses.replace(defaults, **changes)
    except TypeError as e:
        raise InvalidInput(f"bad options for {recipe}: {e}") from None


def run_recipe(
    recipe: Recipe,
    config: TrainConfig,
    options: Any | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``recipe`` with ``config`` and ``options`` (default: the recipe's); returns the final metrics."""
    opts = recipe.options if options is None else options
    need(type(opts) is type(recipe.options), f"{recipe.name} takes options of type {type(recipe.options).__name__}")
    if recipe.run is not None:
        return recipe.run(opts, config, on_eval)
    assert recipe.setup is not None  # checked in Recipe.__post_init__
    setup = recipe.setup
    meta = {"model": recipe.model, "task": recipe.task, "options": options_dict(opts)}
    return train(lambda device: setup(opts, config.seed, device), config, meta=meta, on_eval=on_eval)
