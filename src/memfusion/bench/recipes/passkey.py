"""The fusion recipe: passkey retrieval beyond the attention window, with memory and without.

It wraps :func:`memfusion.bench.fusion_train.train_passkey` (its own loop: AdamW with warm-up and
cosine decay, near/beyond sample mix, greedy decoding at evaluation), so it differs from the other
recipes in three ways: it trains the model with memory and then (``baseline=true``) the same model
without memory on the same batches from the same seed; it evaluates once, after training (the
lines emitted every ``eval_every`` steps carry the training loss, ``"event": "progress"``); and it
writes no checkpoint (``--resume`` is refused). Metrics: exact match and digit accuracy of the
greedy answers on ``eval_samples`` beyond-window sequences, for both runs, and the chance levels.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from memfusion.bench.recipes.base import need
from memfusion.bench.train import FINAL, METRICS, OptimizerName, TrainConfig, TrainResult, parse_device, print_json_line


@dataclasses.dataclass(frozen=True)
class PasskeyOptions:
    """baseline: also train the model without memory; eval_samples: beyond-window test sequences;
    near_fraction: share of training samples with the passkey inside the question's window; window,
    n_segments, n_digits: the task's layout (:class:`~memfusion.bench.tasks.passkey.PasskeySpec`)."""

    baseline: bool = True
    eval_samples: int = 1000
    near_fraction: float = 0.5
    window: int = 32
    n_segments: int = 3
    n_digits: int = 5

    def __post_init__(self) -> None:
        need(self.eval_samples >= 1, f"option eval_samples must be >= 1, got {self.eval_samples}")
        need(0 <= self.near_fraction <= 1, f"option near_fraction must be in [0, 1], got {self.near_fraction}")


def run_passkey(
    options: PasskeyOptions, config: TrainConfig, on_eval: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    """Train and score both runs with :func:`~memfusion.bench.fusion_train.train_passkey`."""
    from memfusion.bench.fusion_train import PasskeyTrainConfig, TrainProgress, train_passkey
    from memfusion.bench.tasks.passkey import PasskeySpec

    emit = on_eval or print_json_line
    need(
        parse_device(config.device).type == "cpu", "fusion passkey trains on the CPU only (train_passkey has no device)"
    )
    need(not config.resume, "fusion passkey trains in one go and writes no checkpoint: run it without --resume")
    need(config.steps >= 1, "fusion passkey needs --steps >= 1 (it scores the trained models)")
    need(config.optimizer is OptimizerName.ADAMW, "fusion passkey trains with adamw only")
    need(config.grad_clip is not None, "fusion passkey needs a gradient clip (train_passkey always clips)")
    assert config.grad_clip is not None
    spec = PasskeySpec(window=options.window, n_segments=options.n_segments, n_digits=options.n_digits)
    train_config = PasskeyTrainConfig(
        task=spec,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        near_fraction=options.near_fraction,
        eval_samples=options.eval_samples,
        log_every=config.eval_every,
    )
    history: list[dict[str, Any]] = []

    def progress(p: TrainProgress) -> None:
        line = {"event": "progress", "run": p.run, "step": p.step, "steps": p.steps, "seconds": round(p.seconds, 3)}
        line["train_loss"] = p.loss
        history.append(line)
        emit(line)

    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        m = train_passkey(train_config, config.steps, config.seed, baseline=options.baseline, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    final: dict[str, Any] = {
        "step": m.steps,
        "steps": config.steps,
        "seconds": round(time.perf_counter() - started, 3),
        "train_loss": m.final_loss_memory,
        "memory_exact_match": m.memory.exact_match,
        "memory_digit_accuracy": m.memory.digit_accuracy,
        "chance_exact_match": 0.1**spec.n_digits,
        "chance_digit_accuracy": 0.1,
        "eval_samples": m.memory.n,
    }
    if m.baseline is not None:
        final.update(
            baseline_exact_match=m.baseline.exact_match,
            baseline_digit_accuracy=m.baseline.digit_accuracy,
            train_loss_baseline=m.final_loss_baseline,
        )
    line = {"event": "eval", **final}
    history.append(line)
    emit(line)
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / METRICS).write_text("".join(json.dumps(h) + "\n" for h in history))
        (config.out / FINAL).write_text(json.dumps(final, indent=2) + "\n")
    return TrainResult(final, tuple(history), None)
