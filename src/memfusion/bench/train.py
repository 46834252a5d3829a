"""The generic training loop of the differentiable memories: seeded, evaluated, checkpointed, resumable.

A :class:`Problem` is what a recipe builds (:mod:`memfusion.bench.recipes`): a model, and how to draw a
training batch, compute its loss and evaluate the model. :func:`train` runs one:

- **seeded**: ``torch.manual_seed(seed)`` before the problem is built (so the initial parameters
  follow the seed), and every training batch comes from one ``torch.Generator`` seeded with ``seed``
  and passed to :meth:`Problem.batch`. Evaluation runs under ``torch.random.fork_rng``, so it never
  moves the training's random streams: evaluating more or less often leaves the trajectory unchanged.
- **optimised** with Adam, AdamW or RMSprop, the learning rate constant or decayed along a cosine
  (:class:`Schedule`), the gradient norm clipped.
- **evaluated** every ``eval_every`` steps and after the last: each evaluation is ONE JSON-able line
  ``{"event": "eval", "step", "steps", "seconds", "train_loss", <metrics>}`` handed to ``on_eval``
  (by default printed to stdout as one JSON line, flushed).
- **checkpointed** after every evaluation when ``out`` is set: ``out/checkpoint.pt`` holds the model,
  the optimizer, the step, the training signature (recipe, options and the settings that shape the
  trajectory), the global and batch-generator RNG states and the evaluation history; it is written
  to a temporary file and renamed, so a crash never leaves half a checkpoint. ``out/metrics.jsonl``
  holds the evaluation lines and ``out/final.json`` the final metrics.
- **resumable**: with ``resume`` the loop restores the checkpoint and continues from its step. The
  invariant (tested): a run resumed from the checkpoint of step ``s`` produces exactly the same
  parameters and evaluation lines as the uninterrupted run. A checkpoint whose signature differs
  from the current run's is refused (``eval_every`` may differ, and ``steps`` under a constant
  learning rate: they do not change the trajectory up to the checkpoint).
- a **progress bar** (rich, transient, on stderr) while training.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput, MemfusionError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
_FORMAT = 1  # the checkpoint layout version


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


class Problem(ABC):
    """A model and its task, as the loop sees them.

    ``model`` holds every trained parameter (the loop moves it to the device, optimises
    :meth:`parameter_groups` and saves its ``state_dict``). :meth:`batch` must draw all its randomness
    from the generator it is given (the loop's checkpoint captures that generator, nothing else);
    :meth:`evaluate` must be deterministic (a fixed evaluation set); it runs in eval mode under
    ``torch.no_grad``.
    """

    model: nn.Module

    @abstractmethod
    def batch(self, batch_size: int, generator: torch.Generator, step: int) -> Any:
        """A training batch for step ``step`` (0-based; a curriculum may depend on it), on the model's device."""

    @abstractmethod
    def loss(self, batch: Any) -> Tensor:
        """The scalar training loss of ``batch``."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """The evaluation metrics, a flat mapping from names to numbers."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (default: one group with every trainable parameter)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]


class OptimizerName(enum.Enum):
    """The optimizers a run may use (``RMSPROP`` as the NTM and MANN papers; ``ADAMW`` decouples weight decay)."""

    ADAM = "adam"
    ADAMW = "adamw"
    RMSPROP = "rmsprop"


class Schedule(enum.Enum):
    """The learning rate along the run: ``CONSTANT``, or ``COSINE``: ``lr * (r + (1 - r) (1 + cos(pi s / S)) / 2)``
    at step ``s`` of ``S`` with ``r = COSINE_FLOOR``, from ``lr`` down to ``r lr`` at the last step (the
    settling a recurrent memory needs after it has learnt: its final evaluation is not caught in a spike)."""

    CONSTANT = "constant"
    COSINE = "cosine"


COSINE_FLOOR = 0.05


def lr_factor(schedule: Schedule, step: int, steps: int) -> float:
    """The multiplier of the base learning rate at 0-based step ``step`` of ``steps``."""
    if schedule is Schedule.CONSTANT:
        return 1.0
    return COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run's settings.

    steps: optimizer steps (0: only evaluate). batch_size, lr, schedule, optimizer, weight_decay; momentum: the
    RMSprop momentum (the NTM paper's 0.9); grad_clip: the largest gradient norm (None: no clipping).
    eval_every: evaluate (and checkpoint) every that many steps, and after the last. seed: the run's
    seed. device: ``cpu``, ``cuda`` or ``cuda:N``. threads: torch's intra-op threads during the run
    (None: leave torch's setting; small recurrent models often run fastest on 1). out: the run's
    directory (checkpoints, metrics); resume: continue from ``out/checkpoint.pt``. progress: show
    the progress bar on stderr.
    """

    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    schedule: Schedule = Schedule.CONSTANT
    optimizer: OptimizerName = OptimizerName.ADAM
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_clip: float | None = 10.0
    eval_every: int = 500
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    out: Path | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            _need(
                isinstance(v, int) and not isinstance(v, bool) and v >= low,
                f"TrainConfig.{name} must be an integer >= {low}, got {v!r}",
            )

        integer("steps", 0)
        integer("batch_size", 1)
        integer("eval_every", 1)
        integer("seed", 0)
        _need(
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0,
            f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}",
        )
        _need(
            isinstance(self.optimizer, OptimizerName),
            f"TrainConfig.optimizer must be an OptimizerName ({', '.join(o.value for o in OptimizerName)}), "
            f"got {self.optimizer!r}",
        )
        _need(
            isinstance(self.schedule, Schedule),
            f"TrainConfig.schedule must be a Schedule ({', '.join(x.value for x in Schedule)}), got {self.schedule!r}",
        )
        _need(self.weight_decay >= 0, f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        _need(0 <= self.momentum < 1, f"TrainConfig.momentum must be in [0, 1), got {self.momentum!r}")
        _need(
            self.grad_clip is None or self.grad_clip > 0,
            f"TrainConfig.grad_clip must be > 0 or None (no clipping), got {self.grad_clip!r}",
        )
        _need(
            self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            f"TrainConfig.threads must be an integer >= 1 or None (torch's setting), got {self.threads!r}",
        )
        parse_device(self.device)
        _need(not self.resume or self.out is not None, "resume needs out: the directory holding checkpoint.pt")

    def signature(self) -> dict[str, Any]:
        """The settings that shape the training trajectory (a resumed run must match them; ``steps``
        too under a decaying schedule, whose learning rate at every step depends on it)."""
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "schedule": self.schedule.value,
            "steps": self.steps if self.schedule is not Schedule.CONSTANT else None,
            "optimizer": self.optimizer.value,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "grad_clip": self.grad_clip,
            "seed": self.seed,
        }


def parse_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; CUDA only when it is available."""
    _need(isinstance(name, str), f"device must be a string (cpu, cuda, cuda:N), got {name!r}")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInput(f"unknown device {name!r}; valid: cpu, cuda, cuda:N") from None
    _need(device.type in ("cpu", "cuda"), f"unknown device {name!r}; valid: cpu, cuda, cuda:N")
    if device.type == "cuda":
        _need(
            torch.cuda.is_available(),
            f"device {name!r} was asked for but CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu",
        )
        _need(
            device.index is None or device.index < torch.cuda.device_count(),
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)",
        )
    return device


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """metrics: the final line (step, steps, seconds, train_loss and the evaluation metrics); history:
    every evaluation line in order; model: the trained model (None for recipes with their own loop)."""

    metrics: dict[str, Any]
    history: tuple[dict[str, Any], ...]
    model: nn.Module | None


def print_json_line(line: Mapping[str, Any]) -> None:
    """The default ``on_eval``: one JSON line on stdout, flushed."""
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerName.ADAM:
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer is OptimizerName.ADAMW:
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.RMSprop(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _evaluate(problem: Problem) -> dict[str, float]:
    was_training = problem.model.training
    problem.model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            metrics = problem.evaluate()
    finally:
        problem.model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`train` (tensors and plain Python values only: loaded with ``weights_only``)."""
    _need(path.is_file(), f"no checkpoint at {path}: run without --resume first (or point --out at a run's directory)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise InvalidInput(f"{path} is not a readable memfusion checkpoint: {e}") from None
    _need(
        isinstance(state, dict) and state.get("format") == _FORMAT,
        f"{path} is not a memfusion checkpoint of format {_FORMAT}",
    )
    return state


def _progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


def train(
    build: Callable[[torch.device], Problem],
    config: TrainConfig,
    *,
    meta: Mapping[str, Any] | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Build the problem (after seeding) on ``config.device`` and train it; see the module docstring.

    ``meta``: JSON-able facts identifying the run (recipe, options), stored in the checkpoint and
    compared on resume. ``on_eval`` receives every evaluation line (default: :func:`print_json_line`).
    Raises :class:`InvalidInput` for bad settings or a mismatched checkpoint, and
    :class:`MemfusionError` if the loss stops being finite (the last checkpoint is kept).
    """
    emit = on_eval or print_json_line
    device = parse_device(config.device)
    signature = {"meta": json.loads(json.dumps(dict(meta or {}))), "train": config.signature()}
    out = config.out
    ckpt_path = out / CHECKPOINT if out is not None else None
    if ckpt_path is not None and not config.resume:
        _need(
            not ckpt_path.exists(),
            f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out",
        )
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        problem = build(device)
        problem.model.to(device)
        generator = torch.Generator().manual_seed(config.seed)
        groups = problem.parameter_groups()
        has_params = any(len(list(g["params"])) for g in groups)
        _need(
            config.steps == 0 or has_params,
            "this problem has no parameters to train; run it with steps = 0 (evaluation only)",
        )
        optimizer = _optimizer(groups, config) if has_params else None
        step, seconds_before, history = 0, 0.0, []
        if config.resume and ckpt_path is not None:
            state = load_checkpoint(ckpt_path)
            _need(
                state["signature"] == signature,
                f"{ckpt_path} belongs to another run: it was made with {state['signature']}, this run is "
                f"{signature}; resume with the same recipe, options and training settings",
            )
            problem.model.load_state_dict(state["model"])
            if optimizer is not None and state["optimizer"] is not None:
                optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            step, seconds_before, history = int(state["step"]), float(state["seconds"]), list(state["history"])
            _need(
                step <= config.steps,
                f"{ckpt_path} is at step {step}, beyond steps = {config.steps}: resume with steps >= {step}",
            )
        return _loop(problem, optimizer, generator, config, signature, emit, step, seconds_before, history)
    finally:
        torch.set_num_threads(previous_threads)


def _loop(
    problem: Problem,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    config: TrainConfig,
    signature: dict[str, Any],
    emit: Callable[[dict[str, Any]], None],
    step: int,
    seconds_before: float,
    history: list[dict[str, Any]],
) -> TrainResult:
    out = config.out
    started = time.perf_counter()
    params = [p for g in problem.parameter_groups() for p in g["params"]]

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - started

    def evaluate_and_save(train_loss: float | None) -> dict[str, Any]:
        line: dict[str, Any] = {
            "event": "eval",
            "step": step,
            "steps": config.steps,
            "seconds": round(elapsed(), 3),
            "train_loss": train_loss,
        }
        line.update(_evaluate(problem))
        history.append(line)
        emit(line)
        if out is not None:
            _save(
                out / CHECKPOINT,
                {
                    "format": _FORMAT,
                    "signature": signature,
                    "step": step,
                    "seconds": line["seconds"],
                    "model": problem.model.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "generator": generator.get_state(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "history": history,
                },
            )
            _write_text(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))
        return line

    problem.model.train()
    last = history[-1] if history and history[-1]["step"] == step else None
    total, count = 0.0, 0
    with _progress_bar(config.progress and step < config.steps) as bar:
        task = bar.add_task("training", total=config.steps, completed=step)
        while step < config.steps:
            assert optimizer is not None  # steps > 0 implies parameters (checked by train)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(config.schedule, step, config.steps)
            batch = problem.batch(config.batch_size, generator, step)
            loss = problem.loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise MemfusionError(
                    f"the training loss became {value} at step {step + 1}; lower --lr or set a gradient clip "
                    f"(the last checkpoint, if any, is in {out})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1
            total, count = total + value, count + 1
            bar.update(task, advance=1, description=f"loss {total / count:.4f}")
            if step % config.eval_every == 0 or step == config.steps:
                last = evaluate_and_save(total / count)
                total, count = 0.0, 0
    if last is None:  # steps = 0: evaluation only
        last = evaluate_and_save(None)
    final = {k: v for k, v in last.items() if k != "event"}
    final["seconds"] = round(elapsed(), 3)
    if out is not None:
        _write_text(out / FINAL, json.dumps(final, indent=2) + "\n")
    return TrainResult(final, tuple(history), problem.model)
