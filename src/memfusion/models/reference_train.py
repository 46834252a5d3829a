"""``memfusion train reference``: train the reference model from a seed on the long-context tasks.

The recipe (what made a small model retrieve on CPU; see :class:`TrainConfig`):

- examples are the benchmark's own task generators (:mod:`memfusion.bench.tasks`) with training
  seeds far from the benchmark's, the loss on the answer and its closing ``</s>`` only, each
  example weighing the same whatever its answer's length;
- a *length curriculum* (:class:`Stage`) with plain positions: the retrieval circuit (key ->
  first digit of the value) forms on 128-token needle tasks first, in a phase change (about step
  400-600 with heads of 64, 1,000-1,450 with heads of 32), and each later stage doubles the
  length, up to the 4K the benchmark asks about; every stage has its own short warm-up and cosine
  decay. Later stages mix example lengths (``Stage.min_length``): a model trained at one length
  only answers at random at twice that length (first-step loss 7-9.9 at 256 after a 128-token
  stage), while one trained on [64, 256] starts [64, 512] at 0.94;
- *digits tagged by their place* (:mod:`memfusion.models.tokenizer`), *after* the lookup has formed
  on bare digits (``Stage.plain_digits``): with bare digits the lookup forms but the copy of a
  7-digit value stays poor (a repeated digit leaves two places to continue from; after 1,500 steps
  of 7-digit values at 256 tokens, 202 of 256 teacher-forced digits were right and greedy exact
  match was 0.25 / 0.08 with noise / essay haystacks), and with place tags from the start the copy
  is learnt at once through the tags but the lookup never forms (2,500 steps, first digit at
  chance while the other digits were right). Bare digits first, then each digit's embedding copied
  to its place tags: the 256-token stage reached loss 0.012 in 550 steps and greedy exact match
  1.00 / 1.00 (48 samples each);
- what did not work on this machine: starting at 192-768 tokens with the whole mixture (no
  retrieval after 4500 steps, 79 min); mixed lengths from the start (the lookup had not formed
  after 3,000 steps); randomised position ids (Ruoss et al. 2023, ``Stage.positions``) from the
  start (no phase change in 1,100 steps) or between plain stages (no faster at 512 than plain
  positions); numbers in pieces of several digits: with 3-digit pieces the 128-token stage stayed
  at chance (3.83, uniform over values) for 2,000 steps; with 2-digit pieces the loss fell slowly
  (1.02 at step 2,050); 8 heads of 32 instead of 4 (no better copy);
- dense supervision: after the first answer, up to ``extra_questions`` more questions about other
  facts / needles of the same context (as in multi-query associative recall);
- AdamW, gradient clipping.

Everything random comes from ``seed``: the same config gives the same weights on the same machine
(thread count and library versions fixed). Evaluation (:func:`evaluate`) is greedy decoding, the
way ``memfusion bench`` scores the model.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from memfusion.errors import InvalidInput
from memfusion.models.reference import ReferenceArch, arch_dict, build, save, spread_digit_places

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from memfusion.bench.tasks.longcontext import LongContextTask, Sample

TRAINING_SEED_BASE = 1_000_000
"""Task seeds of training batches start here, far from the benchmark's seeds (0 by default)."""


def _warm_mixture() -> list[tuple[float, LongContextTask]]:
    from memfusion.bench.tasks.ruler import NiahSingle

    return [(1.0, NiahSingle(haystack="noise", value_digits=5))]


def _noise_mixture() -> list[tuple[float, LongContextTask]]:
    from memfusion.bench.tasks.ruler import NiahSingle, Passkey

    return [
        (2.0, NiahSingle(haystack="noise", value_digits=5)),
        (2.0, NiahSingle(haystack="noise")),
        (1.0, Passkey()),
    ]


def _needles_mixture() -> list[tuple[float, LongContextTask]]:
    from memfusion.bench.tasks.ruler import NiahSingle

    return [
        (1.0, NiahSingle(haystack="noise", value_digits=5)),
        (1.0, NiahSingle(value_digits=5)),
        (1.0, NiahSingle(haystack="noise")),
        (2.0, NiahSingle()),
    ]


def _mixture() -> list[tuple[float, LongContextTask]]:
    from memfusion.bench.tasks.ruler import FactsInText, KvLookup, NiahMultikey, NiahSingle, Passkey

    return [
        (3.0, NiahSingle()),
        (1.0, NiahSingle(haystack="noise")),
        (1.0, NiahSingle(value_digits=5)),
        (2.0, NiahMultikey()),
        (1.0, NiahMultikey(haystack="noise", n_distractors=8)),
        (1.0, Passkey()),
        (2.0, KvLookup()),
        (1.0, KvLookup(value_digits=4)),
        (2.0, FactsInText()),
        (0.5, FactsInText(n_facts=1, value_digits=6)),
    ]


def _long_mixture() -> list[tuple[float, LongContextTask]]:
    from memfusion.bench.tasks.ruler import FactsInText, KvLookup, NiahMultikey, NiahSingle

    return [
        (3.0, NiahSingle()),
        (1.0, NiahSingle(haystack="noise")),
        (1.0, NiahSingle(value_digits=5)),
        (1.0, NiahMultikey()),
        (1.0, KvLookup()),
        (1.0, FactsInText()),
    ]


MIXTURES: dict[str, Callable[[], list[tuple[float, LongContextTask]]]] = {
    "warm": _warm_mixture,
    "noise": _noise_mixture,
    "needles": _needles_mixture,
    "all": _mixture,
    "long": _long_mixture,
}
"""(weight, task) pairs by name (functions: task modules load only when called). ``warm``: one
5-digit needle in repeated filler, where the retrieval circuit forms; ``needles``: NIAH-single
with essay haystacks and 7-digit needles as well; ``all``: every single-answer retrieval task
(needles, multi-key needles, passkeys, key-value lookups, facts in text); ``long``: the
essay needles of the benchmark first, with the fact formats kept in. Introduced one at a
time: a 4-layer model given essays and 7-digit needles from the start had not begun to retrieve
after 750 steps, and one moved from ``warm`` straight to ``all`` at 256 tokens lost it."""
MIXTURE: Callable[[], list[tuple[float, LongContextTask]]] = _mixture


@dataclass(frozen=True)
class Stage:
    """One step of the length curriculum: ``steps`` batches of ``batch`` sequences of ``length``
    tokens drawn from the mixture :data:`MIXTURES` names. With ``until``, the stage ends as soon as
    its smoothed answer loss is at most ``until`` (after ``TrainConfig.min_stage_steps`` at least), and
    ``steps`` is a cap: the retrieval circuit forms after a number of steps that varies from run to
    run (a phase change), and the next, longer stage should start only once it has. With
    ``positions``, each row's position ids are a sorted random subset of ``[0, positions)``
    (randomised positions, Ruoss et al. 2023) instead of ``0..length-1``. With ``min_length``, each
    example's length is drawn uniformly from ``[min_length, length]`` (batches are right-padded).
    With ``plain_digits``, the stage reads numbers with bare digits (``build_tokenizer(digit_places=1)``);
    such stages come first, and the first stage without it spreads each digit's embedding to its
    place tags (:func:`~memfusion.models.reference.spread_digit_places`)."""

    length: int
    batch: int
    steps: int
    mixture: str = "all"
    until: float | None = None
    positions: int | None = None
    min_length: int | None = None
    plain_digits: bool = False


DEFAULT_STAGES = (
    Stage(128, 32, 2500, "warm", until=0.05, plain_digits=True),
    Stage(256, 24, 800, "needles", until=0.02, min_length=64),
    Stage(512, 12, 800, "all", until=0.05, min_length=64),
    Stage(1024, 6, 600, "all", until=0.05, min_length=64),
    Stage(2048, 4, 500, "long", until=0.03, min_length=64),
    Stage(4096, 2, 400, "long", until=0.03, min_length=64),
)
"""The lookup forms at 128 tokens with bare digits (a phase change), then the digits spread to their
place tags and a 256-token stage learns to copy 7-digit values; lengths mixed from 64 tokens then
double up to 4K, with every retrieval format (``all``) at 512-1024 and the benchmark's essay
needles first at 2K-4K (``long``); 5,600 steps at most. The shipped weights are this recipe with
seed 0: 5,195 steps, 70 minutes on 2 CPU cores, NIAH-single essay-7 exact match 1.00 at 2K and
0.94 at 4K (50 samples); with several keys in context (multi-key needles, kv_lookup) 0.00."""


@dataclass(frozen=True)
class TrainConfig:
    """Training of the reference model: the stages run in order; ``warmup`` steps of linear warm-up
    open the first stage, ``stage_warmup`` each later one, then cosine decay to ``min_lr`` within
    the stage. Evaluation every ``eval_every`` steps and at the end of every stage."""

    arch: ReferenceArch = field(default_factory=ReferenceArch)
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 50
    stage_warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    extra_questions: int = 6
    eval_every: int = 500
    min_stage_steps: int = 100  # a stage with ``until`` runs at least this long (its smoothed loss starts afresh)
    eval_lengths: tuple[int, ...] = (2048, 4096)
    eval_samples: int = 16
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if not self.stages or any(s.steps < 1 or s.batch < 1 or s.length < 64 for s in self.stages):
            raise InvalidInput("need at least one stage, each with steps >= 1, batch >= 1 and length >= 64")
        if any(s.until is not None and not (math.isfinite(s.until) and s.until > 0) for s in self.stages):
            raise InvalidInput("a stage's until (the loss that ends it) must be a finite number > 0")
        if unknown := sorted({s.mixture for s in self.stages} - set(MIXTURES)):
            raise InvalidInput(f"unknown mixture(s) {unknown}; valid: {', '.join(MIXTURES)}")
        if max(max(s.length, s.positions or 0) for s in self.stages) > self.arch.max_position:
            raise InvalidInput(f"a stage is longer than the model's max_position ({self.arch.max_position})")
        if any(s.min_length is not None and not 64 <= s.min_length <= s.length for s in self.stages):
            raise InvalidInput("a stage's min_length must be between 64 and its length")
        plain = [s.plain_digits for s in self.stages]
        if plain != sorted(plain, reverse=True):
            raise InvalidInput("stages with plain_digits must all come before the stages without it")
        if any(s.positions is not None and s.positions < s.length for s in self.stages):
            raise InvalidInput("a stage's positions (the span of its random position ids) must be >= its length")
        if min(self.warmup, self.stage_warmup) < 0 or min(self.eval_every, self.eval_samples, self.min_stage_steps) < 1:
            raise InvalidInput(
                "eval_every, eval_samples and min_stage_steps must be >= 1, warmup and stage_warmup >= 0"
            )
        if not (0 < self.min_lr <= self.lr):
            raise InvalidInput("need 0 < min_lr <= lr")

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def scaled(self, steps: int) -> TrainConfig:
        """The same curriculum with ``steps`` in all, shared in proportion (each stage >= 1)."""
        if steps < len(self.stages):
            raise InvalidInput(f"steps must be at least the number of stages ({len(self.stages)}), got {steps}")
        total = self.steps
        stages = [replace(s, steps=max(1, round(s.steps * steps / total))) for s in self.stages]
        stages[-1] = replace(stages[-1], steps=max(1, stages[-1].steps + steps - sum(s.steps for s in stages)))
        return replace(self, stages=tuple(stages))

    def stage_at(self, step: int) -> tuple[int, int]:
        """(index of the stage, step within it) of a global step."""
        for i, stage in enumerate(self.stages):
            if step < stage.steps:
                return i, step
            step -= stage.steps
        raise InvalidInput(f"step {step} is past the last stage")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up then cosine decay to ``min_lr`` at the end of the stage ``step`` falls in."""
    index, within = cfg.stage_at(step)
    steps, warmup = cfg.stages[index].steps, (cfg.warmup if index == 0 else cfg.stage_warmup)
    if within < warmup:
        return cfg.lr * (within + 1) / warmup
    t = (within - warmup) / max(1, steps - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # (B, T) long, right-padded
    position_ids: Tensor  # (B, T) long: 0..T-1 per row, or sorted random positions (Stage.positions)
    labels: Tensor  # (B, T) long: next-token targets aligned to positions (-100 outside answers)
    tasks: tuple[str, ...]


_FACT_LINE = re.compile(r"(?:^|\n)([a-z]+ [a-z]+) <v> (\d+)(?=\n)")
_NEEDLE = re.compile(r"magic numbers for ([a-z]+ [a-z]+) is <v> (\d+)\.")


def extra_questions(sample: Sample, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """Up to ``k`` more (question, answer) pairs about other facts / needles of the sample's context,
    in the task's own question format (none for tasks with one needle): appended after the first
    answer they multiply the supervised retrievals of one sequence (dense supervision, as in
    multi-query associative recall) at the cost of a few tokens each."""
    from memfusion.bench.tasks.ruler import NIAH_QUESTION
    from memfusion.models.tokenizer import format_question

    if sample.task in ("kv_lookup", "facts_in_text"):
        pairs = _FACT_LINE.findall(sample.context)
        ask = lambda key: "\n" + format_question(key)  # noqa: E731
    elif sample.task in ("niah_single", "niah_multikey"):
        pairs = _NEEDLE.findall(sample.context)
        ask = lambda key: NIAH_QUESTION.format(key=key)  # noqa: E731
    else:
        return []
    seen = {k for k, v in pairs if v in sample.answers}
    unique = {}
    for key, value in pairs:  # keys asked once, and only keys with one value
        unique[key] = None if key in unique else value
    choices = [(key, value) for key, value in unique.items() if value is not None and key not in seen]
    return [(ask(key), value) for key, value in rng.sample(choices, min(k, len(choices)))]


def make_batch(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerFast,
    mixture: Sequence[tuple[float, LongContextTask]],
    step: int,
) -> Batch:
    """The batch of global ``step`` (deterministic in ``(cfg.seed, step)``), at its stage's length."""
    import torch

    from memfusion.bench.tasks.training import IGNORE, random_position_ids, training_example

    rng = random.Random(f"reference/{cfg.seed}/{step}")
    stage = cfg.stages[cfg.stage_at(step)[0]]
    length, batch = stage.length, stage.batch
    weights = [w for w, _ in mixture]
    rows: list[tuple[list[int], list[int]]] = []
    names: list[str] = []
    misses = 0
    while len(rows) < batch:
        if misses > 200:
            raise InvalidInput(f"no task of the mixture can make a {length}-token example; use other lengths")
        task = rng.choices([t for _, t in mixture], weights)[0]
        seed = TRAINING_SEED_BASE + rng.getrandbits(40)
        depth = rng.random() if task.has_needle else None
        size = length if stage.min_length is None else rng.randint(stage.min_length, length)
        try:
            sample = task.generate(tokenizer, size, 1, seed=seed, depth=depth)[0]
        except InvalidInput:  # a task that does not fit this length: draw another
            misses += 1
            continue
        ex = training_example(tokenizer, sample)
        ids, mask = list(ex.input_ids), list(ex.loss_mask)
        for question, value in extra_questions(sample, rng, cfg.extra_questions):
            q = tokenizer(question, add_special_tokens=False)["input_ids"]
            a = [*tokenizer(" " + value, add_special_tokens=False)["input_ids"], int(tokenizer.eos_token_id)]
            ids += [*q, *a]
            mask += [0] * len(q) + [1] * len(a)
        # next-token targets: position t predicts ids[t + 1] where that token is under the loss
        targets = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        rows.append((ids, targets))
        names.append(sample.task)
    width = max(len(ids) for ids, _ in rows)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    for r, (ids, targets) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids)] = torch.tensor(targets)
    if stage.positions is None:
        position_ids = torch.arange(width).expand(batch, width).clone()
    else:  # over the batch's width (extra questions may pass length); right padding takes the last ones
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        position_ids = random_position_ids(batch, width, max(stage.positions, width), gen)
    return Batch(input_ids, position_ids, labels, tuple(names))


def answer_loss(model: LlamaForCausalLM, batch: Batch) -> Tensor:
    """Cross-entropy on the answer tokens only, averaged per example then over the batch (every
    example weighs the same); the output layer runs on those positions alone.

    No KV cache is built (``use_cache=False``), and then the all-ones attention mask is required:
    without a mask and a cache, ``transformers`` reads position ids that do not step by 1 as
    *packed sequences* and lets each token see only its own run of consecutive positions, so a
    model trained on randomised positions would never see its context. Right padding needs no
    masking: real tokens never attend to the padding after them."""
    import torch
    import torch.nn.functional as F

    ones = torch.ones_like(batch.input_ids)  # (B, T)
    hidden = model.model(
        input_ids=batch.input_ids, attention_mask=ones, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    keep = batch.labels != -100  # (B, T)
    per_token = F.cross_entropy(model.lm_head(hidden[keep]), batch.labels[keep], reduction="none")  # (n,)
    counts = keep.sum(dim=1)  # (B,)
    weights = (1.0 / counts.clamp_min(1)).unsqueeze(1).expand_as(keep)[keep]  # (n,): 1 / answer length of its row
    return (per_token * weights).sum() / (counts > 0).sum()


def evaluate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    task: LongContextTask,
    length: int,
    n: int,
    seed: int = 0,
    max_new_tokens: int = 12,
) -> float:
    """Mean score of greedy decoding on ``n`` samples of ``task`` at ``length`` (one at a time, plain
    positions), as the benchmark scores it."""
    import torch

    model.eval()
    scores = []
    with torch.inference_mode():
        for sample in task.generate(tokenizer, length, n, seed=seed):
            ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
            out = cast(Any, model).generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
            scores.append(task.score(sample, text))
    model.train()
    return sum(scores) / len(scores)


OPTIMIZER_FILE = "optimizer.pt"
"""The optimizer state beside a training checkpoint (for ``train(resume=True)``; not shipped)."""


def _resumable(cfg: TrainConfig, out: Path, init: Path | None) -> dict[str, Any]:
    """The record of the checkpoint in ``out`` if ``cfg`` goes on from it, else :class:`InvalidInput`."""
    saved = json.loads((out / "training.json").read_text())
    n = int(saved.get("stages_done", 0))
    mine = json.loads(json.dumps({**asdict(cfg), "arch": arch_dict(cfg.arch)}))
    theirs = saved.get("config", {})
    free = ("stages", "threads", "eval_every", "eval_lengths", "eval_samples")  # these leave the weights alone
    fixed = sorted(k for k in mine if k not in free and theirs.get(k) != mine[k])
    if "steps" not in saved or not (out / OPTIMIZER_FILE).is_file():
        raise InvalidInput(f"{out} holds no resumable checkpoint (no optimizer state); train into a new directory")
    if fixed or theirs.get("stages", [])[:n] != mine["stages"][:n] or n > len(cfg.stages):
        what = ", ".join(fixed) or "the stages"
        raise InvalidInput(
            f"the checkpoint in {out} was trained with another recipe ({what} differ); train into a new directory"
        )
    if saved.get("init") != (None if init is None else str(init)):
        raise InvalidInput(f"the checkpoint in {out} started from init={saved.get('init')}; pass the same init")
    return saved


def _load_weights(directory: Path) -> dict[str, Any]:
    from memfusion.models.reference import load

    return load(directory)[0].state_dict()


def _optimizer(model: LlamaForCausalLM, cfg: TrainConfig) -> Any:
    import torch

    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def train(
    cfg: TrainConfig,
    out: Path,
    log: Callable[[dict[str, Any]], None] = lambda _: None,
    progress: Callable[[int, dict[str, float]], None] = lambda _s, _m: None,
    init: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train (from the weights of the checkpoint ``init`` when given, else from scratch), evaluate
    every ``eval_every`` steps and at the end of every stage, save to ``out`` (see
    :func:`memfusion.models.reference.save`, plus the optimizer state) after every stage, so that a
    stopped run keeps its last finished stage; returns the training record (``stages_done`` says how
    far it got). ``resume``: go on from the last stage finished in ``out`` (weights, optimizer state,
    record), which gives the weights of an uninterrupted run; ``cfg`` must start with the stages
    that checkpoint finished, under the same settings (it may add stages after them)."""
    import torch

    from memfusion.bench.tasks import get_task
    from memfusion.models.tokenizer import build_tokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizers = {True: build_tokenizer(cfg.arch.max_position, 1), False: build_tokenizer(cfg.arch.max_position)}
    if not resume and (out / "training.json").is_file():
        raise InvalidInput(f"{out} holds a checkpoint already: resume it (--resume) or train into a new directory")
    saved = _resumable(cfg, out, init) if resume and (out / "training.json").is_file() else None
    done = 0 if saved is None else int(saved["stages_done"])
    plain = cfg.stages[max(done - 1, 0)].plain_digits  # the vocabulary of the weights we start from
    tokenizer = tokenizers[plain]
    model = build(cfg.arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if init is not None or saved is not None:
        source = out if saved is not None else cast(Path, init)
        try:
            model.load_state_dict(_load_weights(source))
        except RuntimeError as exc:
            kind = "bare-digit" if plain else "place-tagged"
            raise InvalidInput(
                f"the weights in {source} do not fit the {kind} tokenizer and the arch of the stage they start; "
                "start from a checkpoint of the same recipe"
            ) from exc
    model.train()
    opt = _optimizer(model, cfg)
    mixtures = {name: MIXTURES[name]() for name in {s.mixture for s in cfg.stages}}
    niah = get_task("niah_single")
    evals: list[dict[str, Any]] = []
    start = time.perf_counter()
    smooth = float("nan")
    trained, earlier = 0, 0.0  # steps trained, minutes of earlier runs
    stage_steps: list[int] = []  # steps each finished stage ran
    if saved is not None:
        trained, earlier = saved["steps"], saved["minutes"]
        stage_steps, evals = list(saved["stage_steps"]), list(saved["evaluations"])
        opt.load_state_dict(torch.load(out / OPTIMIZER_FILE, weights_only=True))
    ends = {sum(s.steps for s in cfg.stages[: i + 1]): i for i in range(len(cfg.stages))}  # last step + 1 -> stage

    def record(stages_done: int) -> dict[str, Any]:
        return {
            "config": {**asdict(cfg), "arch": arch_dict(cfg.arch)},
            "init": None if init is None else str(init),
            "minutes": round(earlier + (time.perf_counter() - start) / 60, 2),
            "stages_done": stages_done,
            "steps": trained,
            "stage_steps": list(stage_steps),
            "threads": cfg.threads,
            "torch": torch.__version__,
            "evaluations": evals,
        }

    step = sum(s.steps for s in cfg.stages[:done])  # the planned step: a stage that ends early skips the rest
    while step < cfg.steps:
        index, within = cfg.stage_at(step)
        stage = cfg.stages[index]
        smooth = float("nan") if within == 0 else smooth
        if plain and not stage.plain_digits:  # the first place-tagged stage: digits spread to their places
            spread_digit_places(model)
            opt, plain, tokenizer = _optimizer(model, cfg), False, tokenizers[False]
        batch = make_batch(cfg, tokenizer, mixtures[stage.mixture], step)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = answer_loss(model, batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss is {loss.item()} at step {step}: lower lr or raise warmup")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        trained += 1
        smooth = loss.item() if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss.item()
        progress(step + 1, {"loss": smooth})
        early = stage.until is not None and within + 1 >= cfg.min_stage_steps and smooth <= stage.until
        end = step + 1 in ends or early
        if trained % cfg.eval_every == 0 or end:
            minutes = earlier + (time.perf_counter() - start) / 60
            row: dict[str, Any] = {"step": trained, "stage": index, "stage_step": within + 1, "length": stage.length}
            row |= {"loss": round(smooth, 4), "minutes": round(minutes, 2)}
            for length in cfg.eval_lengths:
                row[f"niah_single@{length}"] = evaluate(model, tokenizer, niah, length, cfg.eval_samples, seed=7)
            evals.append(row)
            log(row)
        if end:
            stage_steps.append(within + 1)
            save(model, tokenizer, out, record(index + 1))
            torch.save(opt.state_dict(), out / OPTIMIZER_FILE)
            step = sum(s.steps for s in cfg.stages[: index + 1])
        else:
            step += 1
    return record(len(cfg.stages))
