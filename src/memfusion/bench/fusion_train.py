"""Train the fusion model on passkey retrieval, with memory and without, and score both beyond the window.

The recipe (:func:`train_passkey`): fresh seeded batches every step, AdamW with linear warm-up and
cosine decay, cross-entropy on the answer digits only, gradient clipping. Earlier segments run
without autograd: their pairs reach the question's segment only through the detached memory, so
the loss (on the last segment) has no gradient through them anyway.

Training mixes *near* samples (the passkey in the question's segment) with *beyond* samples. The
near samples are what teaches the projections: the memory stores detached keys and values, so the
keys a memory read matches are learned only through the local attention that shares them (as in
Memorizing Transformers). Evaluation uses beyond-the-window samples only, decoded greedily (each
predicted digit is fed back as the next input), over the full vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from memfusion.bench.tasks.passkey import PasskeyScore, PasskeySpec, passkey_batch, score_passkey
from memfusion.errors import InvalidInput
from memfusion.neural.fusion import FusionConfig
from memfusion.neural.fusion_lm import FusionLM, FusionLMConfig, run_segments

PASSKEY_STEPS = 5000
"""Steps of the reference run. With the default :class:`PasskeyTrainConfig`, seed 0, one CPU thread:
beyond-window exact match 1.0 (1000 samples) with memory, 0.0 without (per-digit 0.107, chance 0.1);
289 s + 197 s of training on a shared 2-core machine. ``tests/bench/test_tasks_passkey.py`` checks
it under ``-m slow``."""

EVAL_SEED_OFFSET = 1_000_003
"""The evaluation batches are drawn from ``seed + EVAL_SEED_OFFSET``, a stream training never uses."""


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclass(frozen=True)
class PasskeyTrainConfig:
    """Task, model and optimiser. ``memory_layer`` is the layer given memory in the memory run (the
    baseline has none); ``near_fraction``: share of training samples with the passkey in the
    question's segment; ``eval_samples``: beyond-window samples scored after training."""

    task: PasskeySpec = field(default_factory=PasskeySpec)
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    memory_layer: int = 1
    top_k: int = 8
    retriever: str = "knn"
    rotary: bool = False
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    near_fraction: float = 0.5
    eval_samples: int = 1000
    log_every: int = 50

    def __post_init__(self) -> None:
        _need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _need(self.warmup >= 0, f"warmup must be >= 0 steps, got {self.warmup}")
        _need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _need(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        _need(0.0 <= self.near_fraction <= 1.0, f"near_fraction must be in [0, 1], got {self.near_fraction}")
        _need(self.eval_samples >= 1, f"eval_samples must be >= 1, got {self.eval_samples}")
        _need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        self.model(memory=True)  # validates the model fields with the model's own messages

    def model(self, memory: bool) -> FusionLMConfig:
        """The model config of the memory run (``memory=True``) or of the baseline."""
        attention = FusionConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            top_k=self.top_k,
            capacity=max(self.top_k, self.task.length),
            retriever=self.retriever,
            rotary=self.rotary,
        )
        return FusionLMConfig(
            vocab_size=self.task.vocab_size,
            window=self.task.window,
            n_layers=self.n_layers,
            memory_layer=self.memory_layer if memory else None,
            attention=attention,
        )


@dataclass(frozen=True)
class TrainProgress:
    """What the ``progress`` callback receives every ``log_every`` steps (and at the last step)."""

    run: str  # "memory" or "baseline"
    step: int  # steps done
    steps: int
    loss: float  # mean answer loss over the steps since the last report
    seconds: float  # since this run started


@dataclass(frozen=True)
class PasskeyMetrics:
    """Beyond-window passkey scores of both runs, with the steps and wall time that produced them."""

    memory: PasskeyScore
    baseline: PasskeyScore | None
    steps: int
    seed: int
    seconds_memory: float
    seconds_baseline: float | None
    final_loss_memory: float
    final_loss_baseline: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def greedy_passkey(model: FusionLM, ids: torch.Tensor, spec: PasskeySpec) -> torch.Tensor:
    """Decode the answer of ids (B, T) greedily: the prefix segments fill the memory, then the
    question's segment is run once per digit with the answer so far fed back. Returns (B, L); the
    answer tokens in ``ids`` are never read (they are overwritten before any position sees them)."""
    w, n, q = spec.window, spec.n_digits, spec.query_pos - (spec.length - spec.window)
    _, memory = run_segments(model, ids[:, :-w])
    last = ids[:, -w:].clone()  # (B, W)
    last[:, q + 1 :] = 0
    out = []
    for j in range(n):
        logits, _ = model(last, memory)  # (B, W, V)
        digit = logits[:, q + j].argmax(-1)  # (B,)
        out.append(digit)
        if j + 1 < n:
            last[:, q + j + 1] = digit
    return torch.stack(out, dim=1)  # (B, L)


def evaluate_passkey(model: FusionLM, spec: PasskeySpec, samples: int, seed: int, chunk: int = 250) -> PasskeyScore:
    """Greedy exact-match and per-digit accuracy on ``samples`` beyond-window sequences of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    preds, keys = [], []
    was_training = model.training
    model.eval()
    for start in range(0, samples, chunk):
        batch = passkey_batch(spec, min(chunk, samples - start), gen, near_fraction=0.0)
        preds.append(greedy_passkey(model, batch.ids, spec))
        keys.append(batch.passkeys)
    model.train(was_training)
    return score_passkey(torch.cat(preds), torch.cat(keys))


def _train(
    config: PasskeyTrainConfig,
    memory: bool,
    steps: int,
    seed: int,
    progress: Callable[[TrainProgress], None] | None,
) -> tuple[FusionLM, float, float]:
    """Train one model; returns (model, last reported loss, seconds)."""
    spec, run = config.task, "memory" if memory else "baseline"
    torch.manual_seed(seed)
    model = FusionLM(config.model(memory))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(seed)
    w, start = spec.window, time.perf_counter()
    total, count, last_loss = 0.0, 0, float("nan")
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * _schedule(step, steps, config.warmup)
        batch = passkey_batch(spec, config.batch_size, gen, config.near_fraction)
        logits, _ = run_segments(model, batch.ids, grad_from=spec.n_segments - 1)  # (B, T, V)
        loss = F.cross_entropy(logits[:, -w:].reshape(-1, spec.vocab_size), batch.targets[:, -w:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        total, count = total + loss.item(), count + 1
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            last_loss = total / count
            if progress is not None:
                progress(TrainProgress(run, step + 1, steps, last_loss, time.perf_counter() - start))
            total, count = 0.0, 0
    return model, last_loss, time.perf_counter() - start


def train_passkey(
    config: PasskeyTrainConfig,
    steps: int,
    seed: int = 0,
    *,
    baseline: bool = True,
    progress: Callable[[TrainProgress], None] | None = None,
) -> PasskeyMetrics:
    """Train the model with memory (and, if ``baseline``, the same model without memory, on the
    same batches from the same initial seed) for ``steps`` steps; score both on the same
    ``config.eval_samples`` beyond-window sequences."""
    _need(steps >= 1, f"steps must be >= 1, got {steps}")
    eval_seed = seed + EVAL_SEED_OFFSET
    model, loss_m, sec_m = _train(config, True, steps, seed, progress)
    score_m = evaluate_passkey(model, config.task, config.eval_samples, eval_seed)
    score_b, loss_b, sec_b = None, None, None
    if baseline:
        base, loss_b, sec_b = _train(config, False, steps, seed, progress)
        score_b = evaluate_passkey(base, config.task, config.eval_samples, eval_seed)
    return PasskeyMetrics(score_m, score_b, steps, seed, sec_m, sec_b, loss_m, loss_b)


__all__ = [
    "PASSKEY_STEPS",
    "PasskeyMetrics",
    "PasskeyTrainConfig",
    "TrainProgress",
    "evaluate_passkey",
    "greedy_passkey",
    "train_passkey",
]
