"""The generic training loop (``memfusion.bench.train``) on a tiny model, and the recipes built on it.

The loop is checked against a hand-written reference loop (same seed, same batches, same optimizer:
the same parameters bit for bit); checkpoint + resume against the uninterrupted run; the recipes'
evaluations against direct computations of their metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memfusion.bench.recipes import RECIPES, find_recipe, parse_options, run_recipe
from memfusion.bench.recipes.baselines import DKT, DKTConfig, LSTMBaseline, LSTMConfig
from memfusion.bench.recipes.capacity import CapacityOptions, CapacityProblem
from memfusion.bench.recipes.fewshot import FewShotOptions, FewShotProblem
from memfusion.bench.recipes.kt_bayes import bayes_predictions
from memfusion.bench.recipes.sequence import SequenceOptions
from memfusion.bench.recipes.tracing import TracingOptions, TracingProblem
from memfusion.bench.tasks.associative import HopfieldPatterns
from memfusion.bench.tasks.fewshot import accuracy_by_instance
from memfusion.bench.tasks.tracing import Synthetic5, auc
from memfusion.bench.train import (
    CHECKPOINT,
    FINAL,
    METRICS,
    OptimizerName,
    Problem,
    Schedule,
    TrainConfig,
    load_checkpoint,
    train,
)
from memfusion.errors import InvalidInput, MemfusionError

FIXTURES = Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")


class Toy(Problem):
    """Regression of y = x . w* with a dropout MLP: its training uses the global RNG (dropout) and the
    batch generator; its evaluation draws from the global RNG on purpose (the loop must isolate it)."""

    def __init__(self, fail_at: int | None = None, nan_at: int | None = None) -> None:
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        self.eval_x = torch.linspace(-1, 1, 40).reshape(10, 4)
        self.fail_at, self.nan_at = fail_at, nan_at

    def batch(self, batch_size: int, generator: torch.Generator, step: int) -> tuple[Tensor, Tensor]:
        if step == self.fail_at:
            raise RuntimeError("simulated crash")
        x = torch.randn(batch_size, 4, generator=generator)
        return x, x @ self.w

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        return loss * float("nan") if self.nan_at is not None else loss

    def evaluate(self) -> dict[str, float]:
        torch.rand(3)  # consumes the global RNG: must not change the training trajectory
        return {"eval_mse": float(F.mse_loss(self.model(self.eval_x), self.eval_x @ self.w))}


def cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(steps=10, batch_size=8, lr=1e-2, eval_every=4, seed=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def params(model: nn.Module | None) -> list[Tensor]:
    assert model is not None
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def strip_time(lines: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def reference_loop(config: TrainConfig) -> tuple[list[Tensor], list[float]]:
    """The loop written out by hand: seed, build, Adam, clip, the same batches."""
    torch.manual_seed(config.seed)
    problem = Toy()
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(problem.model.parameters(), lr=config.lr)
    losses = []
    problem.model.train()
    for step in range(config.steps):
        loss = problem.loss(problem.batch(config.batch_size, gen, step))
        opt.zero_grad()
        loss.backward()
        assert config.grad_clip is not None
        torch.nn.utils.clip_grad_norm_(list(problem.model.parameters()), config.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return params(problem.model), losses


def test_loop_equals_a_hand_written_loop_and_emits_one_line_per_evaluation() -> None:
    lines: list[dict[str, Any]] = []
    config = cfg()
    result = train(lambda d: Toy(), config, on_eval=lines.append)
    ref_params, ref_losses = reference_loop(config)
    assert same(params(result.model), ref_params)
    assert [line["step"] for line in lines] == [4, 8, 10]
    assert all(line["event"] == "eval" and line["steps"] == 10 for line in lines)
    # train_loss is the mean loss of the steps since the previous evaluation
    windows = [ref_losses[0:4], ref_losses[4:8], ref_losses[8:10]]
    for line, window in zip(lines, windows, strict=True):
        assert line["train_loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)
    assert lines[-1]["eval_mse"] == result.metrics["eval_mse"]
    assert result.metrics["step"] == 10 and "event" not in result.metrics
    assert list(result.history) == lines


def test_default_output_is_one_json_line_per_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    train(lambda d: Toy(), cfg(steps=6, eval_every=3))
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["step"] for line in out] == [3, 6]


def test_evaluating_more_often_does_not_change_the_trajectory() -> None:
    a = train(lambda d: Toy(), cfg(eval_every=1), on_eval=lambda _: None)
    b = train(lambda d: Toy(), cfg(eval_every=10), on_eval=lambda _: None)
    assert same(params(a.model), params(b.model))


def test_seeds_reproduce_and_differ() -> None:
    a = train(lambda d: Toy(), cfg(seed=5), on_eval=lambda _: None)
    b = train(lambda d: Toy(), cfg(seed=5), on_eval=lambda _: None)
    c = train(lambda d: Toy(), cfg(seed=6), on_eval=lambda _: None)
    assert same(params(a.model), params(b.model))
    assert not same(params(a.model), params(c.model))


def test_resumed_run_continues_exactly_like_the_uninterrupted_one(tmp_path: Path) -> None:
    full_lines: list[dict[str, Any]] = []
    full = train(lambda d: Toy(), cfg(steps=12, out=tmp_path / "full"), on_eval=full_lines.append)

    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies at step 9: the checkpoint is step 8
        train(lambda d: Toy(fail_at=9), cfg(steps=12, out=out), on_eval=lambda _: None)
    assert load_checkpoint(out / CHECKPOINT)["step"] == 8
    resumed_lines: list[dict[str, Any]] = []
    resumed = train(lambda d: Toy(), cfg(steps=12, out=out, resume=True), on_eval=resumed_lines.append)

    assert same(params(resumed.model), params(full.model))
    assert strip_time(resumed_lines) == strip_time(full_lines[2:])  # the evaluation at step 12
    assert strip_time(resumed.history) == strip_time(full.history)
    files = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    assert strip_time(files) == strip_time(full_lines)
    final = json.loads((out / FINAL).read_text())
    assert final["step"] == 12 and final["eval_mse"] == full.metrics["eval_mse"]


def test_resume_can_extend_a_finished_run(tmp_path: Path) -> None:
    full = train(lambda d: Toy(), cfg(steps=12), on_eval=lambda _: None)
    train(lambda d: Toy(), cfg(steps=8, out=tmp_path), on_eval=lambda _: None)
    longer = train(lambda d: Toy(), cfg(steps=12, out=tmp_path, resume=True), on_eval=lambda _: None)
    assert same(params(longer.model), params(full.model))
    again: list[dict[str, Any]] = []  # resuming a finished run evaluates nothing and trains nothing
    done = train(lambda d: Toy(), cfg(steps=12, out=tmp_path, resume=True), on_eval=again.append)
    assert again == [] and same(params(done.model), params(full.model))
    with pytest.raises(InvalidInput, match="beyond steps = 6"):
        train(lambda d: Toy(), cfg(steps=6, out=tmp_path, resume=True), on_eval=lambda _: None)


def test_checkpoint_guards(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no checkpoint"):
        train(lambda d: Toy(), cfg(out=tmp_path, resume=True), on_eval=lambda _: None)
    train(lambda d: Toy(), cfg(steps=4, out=tmp_path), on_eval=lambda _: None)
    with pytest.raises(InvalidInput, match="--resume"):
        train(lambda d: Toy(), cfg(steps=4, out=tmp_path), on_eval=lambda _: None)
    with pytest.raises(InvalidInput, match="another run"):
        train(lambda d: Toy(), cfg(steps=8, lr=0.5, out=tmp_path, resume=True), on_eval=lambda _: None)
    with pytest.raises(InvalidInput, match="another run"):
        train(lambda d: Toy(), cfg(steps=8, out=tmp_path, resume=True), meta={"model": "x"}, on_eval=lambda _: None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="not a readable"):
        train(lambda d: Toy(), cfg(out=tmp_path / "bad", resume=True), on_eval=lambda _: None)


def test_optimizers_and_no_clipping_match_torch() -> None:
    for name, make in (
        (OptimizerName.ADAMW, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        (OptimizerName.RMSPROP, lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, weight_decay=0.1)),
    ):
        config = cfg(optimizer=name, weight_decay=0.1, grad_clip=None)
        result = train(lambda d: Toy(), config, on_eval=lambda _: None)
        torch.manual_seed(config.seed)
        toy, gen = Toy(), torch.Generator().manual_seed(config.seed)
        opt = make(toy.model.parameters())
        for step in range(config.steps):
            loss = toy.loss(toy.batch(config.batch_size, gen, step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert same(params(result.model), params(toy.model)), name


def test_cosine_schedule_matches_a_hand_written_decay(tmp_path: Path) -> None:
    config = cfg(schedule=Schedule.COSINE, steps=7)
    result = train(lambda d: Toy(), config, on_eval=lambda _: None)
    torch.manual_seed(config.seed)
    toy, gen = Toy(), torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(toy.model.parameters(), lr=config.lr)
    for step in range(config.steps):
        for group in opt.param_groups:  # lr (r + (1 - r) (1 + cos(pi s / S)) / 2), r = 0.05
            group["lr"] = config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        loss = toy.loss(toy.batch(config.batch_size, gen, step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(toy.model.parameters()), 10.0)
        opt.step()
    assert same(params(result.model), params(toy.model))
    # under a decaying schedule the number of steps shapes the run: a resume must keep it
    train(lambda d: Toy(), cfg(schedule=Schedule.COSINE, steps=4, out=tmp_path), on_eval=lambda _: None)
    with pytest.raises(InvalidInput, match="another run"):
        train(lambda d: Toy(), cfg(schedule=Schedule.COSINE, steps=8, out=tmp_path, resume=True))


def test_steps_zero_only_evaluates_and_parameterless_problems_cannot_train() -> None:
    lines: list[dict[str, Any]] = []
    result = train(lambda d: Toy(), cfg(steps=0), on_eval=lines.append)
    assert len(lines) == 1 and lines[0]["step"] == 0 and lines[0]["train_loss"] is None
    assert result.metrics["eval_mse"] == lines[0]["eval_mse"]
    capacity = CapacityOptions(dim=16, counts=(2,), memories=1)
    with pytest.raises(InvalidInput, match="no parameters"):
        train(lambda d: CapacityProblem(capacity, 0, d), cfg(steps=3), on_eval=lambda _: None)


def test_a_diverging_loss_is_reported() -> None:
    with pytest.raises(MemfusionError, match="loss became nan"):
        train(lambda d: Toy(nan_at=0), cfg(), on_eval=lambda _: None)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": -1}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"eval_every": 0}, "eval_every"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"momentum": 1.0}, "momentum"),
        ({"threads": 0}, "threads"),
        ({"device": "tpu"}, "unknown device"),
        ({"resume": True}, "resume needs out"),
        ({"optimizer": "adam"}, "OptimizerName"),
        ({"schedule": "cosine"}, "Schedule"),
    ],
)
def test_bad_config(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        cfg(**kw)


def test_cuda_asked_for_but_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInput, match="CUDA is not available"):
        cfg(device="cuda")


# --- recipes -------------------------------------------------------------------------------------


def test_options_are_parsed_from_strings_once() -> None:
    o = parse_options(SequenceOptions(), {"hidden_size": "32", "eval_lengths": "20, 40", "max_length": "none"})
    assert (o.hidden_size, o.eval_lengths, o.max_length) == (32, (20, 40), None)
    f = parse_options(FewShotOptions(), {"data": "/x/omniglot", "n_way": "15"})
    assert f.data == Path("/x/omniglot") and f.n_way == 15
    t = parse_options(TracingOptions(), {"test_fraction": "0.25"})
    assert t.test_fraction == 0.25
    with pytest.raises(InvalidInput, match=r"unknown option\(s\) bogus .*valid: hidden_size"):
        parse_options(SequenceOptions(), {"bogus": "1"})
    with pytest.raises(InvalidInput, match="must be an integer"):
        parse_options(SequenceOptions(), {"hidden_size": "big"})
    with pytest.raises(InvalidInput, match="integer >= 1, got 0"):
        parse_options(SequenceOptions(), {"hidden_size": "0"})
    passkey = find_recipe("fusion", "passkey").options
    assert parse_options(passkey, {"baseline": "false"}).baseline is False
    with pytest.raises(InvalidInput, match="true or false"):
        parse_options(passkey, {"baseline": "maybe"})


def test_find_recipe_lists_the_valid_names() -> None:
    assert find_recipe("ntm", "copy").name == "ntm copy"
    with pytest.raises(InvalidInput, match=r"unknown model 'reference'.*ntm: copy"):
        find_recipe("reference", "copy")
    with pytest.raises(InvalidInput, match=r"needs --task; valid tasks for mann: fewshot"):
        find_recipe("mann", None)
    with pytest.raises(InvalidInput, match=r"no recipe trains dkvmn on 'copy'.*synthetic5"):
        find_recipe("dkvmn", "copy")


def test_the_registry_has_every_reproduction() -> None:
    wanted = {
        ("ntm", "copy"),
        ("lstm", "copy"),
        ("ntm", "associative_recall"),
        ("ntm", "repeat_copy"),
        ("ntm", "priority_sort"),
        ("dnc", "traversal"),
        ("dnc", "shortest_path"),
        ("dnc", "copy"),
        ("mann", "fewshot"),
        ("lstm", "fewshot"),
        ("dkvmn", "synthetic5"),
        ("dkt", "synthetic5"),
        ("dkvmn", "assistments"),
        ("hopfield", "capacity"),
        ("fusion", "passkey"),
    }
    assert wanted <= set(RECIPES)


# Small options per recipe so that every one builds, trains two steps and evaluates in a second or so.
_SMALL_SEQ = {"hidden_size": "8", "memory_slots": "8", "memory_width": "4", "eval_size": "4", "layers": "1"}
_SMALL: dict[tuple[str, str], dict[str, str]] = {
    ("ntm", "copy"): {**_SMALL_SEQ, "max_length": "3", "eval_lengths": "5"},
    ("lstm", "copy"): {**_SMALL_SEQ, "max_length": "3", "eval_lengths": "5"},
    ("ntm", "associative_recall"): {**_SMALL_SEQ, "max_length": "3", "eval_lengths": "4"},
    ("ntm", "repeat_copy"): {**_SMALL_SEQ, "max_length": "2"},
    ("ntm", "priority_sort"): {**_SMALL_SEQ, "min_length": "3", "max_length": "4"},
    ("dnc", "copy"): {**_SMALL_SEQ, "max_length": "3", "eval_lengths": "5", "read_heads": "2"},
    ("dnc", "traversal"): {**_SMALL_SEQ, "max_length": "2", "curriculum": "2"},
    ("dnc", "shortest_path"): {**_SMALL_SEQ, "max_length": "2", "eval_lengths": "3"},
    ("mann", "fewshot"): {"glyph_classes": "12", "train_classes": "7", "hidden_size": "8", "eval_episodes": "3"},
    ("lstm", "fewshot"): {"glyph_classes": "12", "train_classes": "7", "hidden_size": "8", "eval_episodes": "3"},
    ("dkvmn", "synthetic5"): {"students": "40", "value_size": "8", "key_size": "8", "memory_size": "4"},
    ("dkt", "synthetic5"): {"students": "40", "hidden_size": "8"},
    ("dkvmn", "assistments"): {
        "data": str(FIXTURES / "assistments_tiny.csv"),
        "value_size": "8",
        "test_fraction": "0.5",
    },
    ("hopfield", "capacity"): {"dim": "16", "counts": "2,40", "memories": "2"},
    ("fusion", "passkey"): {"eval_samples": "4"},
}


@pytest.mark.parametrize("key", sorted(RECIPES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_every_recipe_trains_and_evaluates(key: tuple[str, str]) -> None:
    recipe = RECIPES[key]
    assert key in _SMALL, f"add small options for {key} to this test"
    options = recipe.with_options(_SMALL[key])
    steps = 0 if recipe.task == "capacity" else 2
    config = recipe.config(steps=steps, eval_every=1, batch_size=2, progress=False)
    lines: list[dict[str, Any]] = []
    result = run_recipe(recipe, config, options, on_eval=lines.append)
    assert result.metrics["step"] == steps
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, float) and k != "seconds"}
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert lines and json.loads(json.dumps(lines))  # every line is JSON-able


def test_sequence_recipe_metrics_match_a_direct_computation() -> None:
    recipe = find_recipe("ntm", "copy")
    options = recipe.with_options({**_SMALL_SEQ, "max_length": "4", "eval_lengths": "6", "eval_size": "5"})
    problem = recipe.setup(options, 7, CPU)  # type: ignore[misc]
    problem.model.eval()
    with torch.no_grad():
        got = problem.evaluate()
        for suffix, batch in problem.eval_sets:  # type: ignore[attr-defined]
            logits = problem.model(batch.inputs)[0]
            errors = []
            for b in range(batch.batch_size):  # a per-row loop over the answer steps
                wrong = 0
                for t in range(batch.steps):
                    if batch.mask[b, t] > 0:
                        wrong += int(((logits[b, t] > 0).float() != batch.targets[b, t]).sum())
                errors.append(wrong)
            assert got[f"bit_errors{suffix}"] == pytest.approx(sum(errors) / len(errors))
            assert got[f"seq_accuracy{suffix}"] == pytest.approx(sum(e == 0 for e in errors) / len(errors))
    assert problem.eval_sets[1][1].inputs.shape[1] == 2 * 6 + 1  # type: ignore[attr-defined]


def test_curriculum_widens_the_length_range() -> None:
    recipe = find_recipe("ntm", "copy")
    options = recipe.with_options({**_SMALL_SEQ, "min_length": "1", "max_length": "9", "curriculum": "80"})
    problem = recipe.setup(options, 0, CPU)  # type: ignore[misc]
    g = torch.Generator().manual_seed(0)
    longest = [int(problem.batch(64, g, step).mask.sum(1).max()) for step in (0, 40, 79, 80, 500)]
    assert longest[0] == 1 and longest[1] <= 5 and longest[3] == longest[4] == 9


def test_fewshot_evaluation_equals_accuracy_over_all_episodes_at_once() -> None:
    options = FewShotOptions(glyph_classes=14, train_classes=8, hidden_size=8, eval_episodes=110)
    problem = FewShotProblem("mann", options, 4, CPU)
    problem.model.eval()
    with torch.no_grad():
        got = problem.evaluate()  # runs in chunks of 100 + 10 episodes
        from memfusion.bench.recipes.base import eval_generator

        g = eval_generator(4)
        eps = [problem.test_episodes.batch(100, g), problem.test_episodes.batch(10, g)]
        logits = torch.cat([problem.model(e.inputs)[0] for e in eps])
        merged = dataclasses.replace(
            eps[0],
            inputs=torch.cat([e.inputs for e in eps]),
            targets=torch.cat([e.targets for e in eps]),
            mask=torch.cat([e.mask for e in eps]),
            labels=torch.cat([e.labels for e in eps]),
            instance=torch.cat([e.instance for e in eps]),
            classes=torch.cat([e.classes for e in eps]),
        )
        want = accuracy_by_instance(logits, merged, (1, 2, 5, 10))
    assert got == pytest.approx({f"accuracy_{i}": v for i, v in want.items()})


def test_fewshot_reads_omniglot_from_data() -> None:
    options = FewShotOptions(
        data=FIXTURES / "omniglot", train_classes=4, n_way=2, instances=3, hidden_size=8, eval_episodes=2
    )
    problem = FewShotProblem("lstm", options, 0, CPU)
    assert problem.train_episodes.class_set.n_classes == 4 and problem.test_episodes.class_set.n_classes == 2
    assert set(problem.evaluate()) == {"accuracy_1", "accuracy_2"}
    with pytest.raises(InvalidInput, match="leave test classes"):
        FewShotProblem("lstm", dataclasses.replace(options, train_classes=6), 0, CPU)


def test_tracing_evaluation_is_the_auc_of_all_test_steps() -> None:
    options = TracingOptions(students=30, hidden_size=8)
    problem = TracingProblem("dkt", "synthetic5", options, CPU)
    problem.model.eval()
    with torch.no_grad():
        got = problem.evaluate()
        test = problem.test
        p = torch.sigmoid(problem.model.predict_logits(test.one_based(), test.responses))  # type: ignore[operator]
    assert got["auc"] == pytest.approx(auc(p[test.mask], test.responses[test.mask]))
    assert 0.5 < got["bayes_auc"] < got["oracle_auc"] < 1.0
    with pytest.raises(InvalidInput, match="--data PATH"):
        TracingProblem("dkvmn", "assistments", options, CPU)


def test_synthetic5_from_released_files() -> None:
    """data= / test_data= in the three-line layout replace the generator (no generator references then)."""
    files = {"data": FIXTURES / "three_line_tiny.csv", "test_data": FIXTURES / "three_line_tiny_test.csv"}
    options = TracingOptions(**files, value_size=8, key_size=8, memory_size=4)
    problem = TracingProblem("dkvmn", "synthetic5", options, CPU)
    assert len(problem.train) == 3 and len(problem.test) == 2
    assert problem.train.n_questions == problem.test.n_questions == 7  # the test file's largest id is 6
    assert set(problem.evaluate()) == {"auc"}
    with pytest.raises(InvalidInput, match="both data=TRAIN and test_data=TEST"):
        TracingProblem("dkvmn", "synthetic5", TracingOptions(data=files["data"]), CPU)


@torch.no_grad()
def test_dkt_predicts_step_t_from_the_past_only() -> None:
    torch.manual_seed(0)
    model = DKT(DKTConfig(num_questions=6, hidden_size=8, embed_size=5))
    q = torch.tensor([[1, 3, 2, 6, 4, 0]])
    r = torch.tensor([[1, 0, 1, 1, 0, 0]])
    base = model.predict_logits(q, r)
    r2 = r.clone()
    r2[0, 3] = 0  # the response at t = 3 may change predictions after 3 only
    changed = (model.predict_logits(q, r2) != base)[0]
    assert not changed[:4].any() and changed[4]
    q2 = q.clone()
    q2[0, 2] = 5  # the question at t = 2 changes the prediction at 2 (its output unit) and later ones
    changed = (model.predict_logits(q2, r) != base)[0]
    assert not changed[:2].any() and changed[2] and changed[3]
    assert base[0, 5] == 0.0  # padding
    # the prediction at step 0 is the output layer's bias for question q_0 (nothing seen yet)
    assert float(base[0, 0]) == pytest.approx(float(model.output.bias[0]))


def test_lstm_baseline_shapes_and_bad_input() -> None:
    model = LSTMBaseline(LSTMConfig(5, 3, hidden_size=7, layers=2))
    y, (h, _) = model(torch.zeros(2, 4, 5))
    assert y.shape == (2, 4, 3) and h.shape == (2, 2, 7)
    with pytest.raises(InvalidInput, match="expects input"):
        model(torch.zeros(2, 4, 6))
    with pytest.raises(InvalidInput, match="hidden_size"):
        LSTMConfig(5, 3, hidden_size=0)


def test_capacity_matches_a_per_probe_computation() -> None:
    options = CapacityOptions(dim=24, flip_fraction=0.2, counts=(3, 60), beta=0.5, memories=2)
    problem = CapacityProblem(options, 0, CPU)
    got = problem.evaluate()
    for n in options.counts:
        batch = HopfieldPatterns(dim=24, n_patterns=n, flip_fraction=0.2).batch(
            2, torch.Generator().manual_seed(0 * 1_000_003 + n)
        )
        right, total = 0, 0
        for b in range(2):
            y = batch.patterns[b]  # (P, D)
            for q in range(batch.probes.shape[1]):
                xi = batch.probes[b, q]
                new = torch.softmax(0.5 * (y @ xi), dim=0) @ y  # one modern update, by hand
                right += int(torch.equal(torch.sign(new), y[batch.targets[b, q]]))
                total += 1
        assert got[f"modern@{n}"] == pytest.approx(right / total)
    assert got["classical@3"] > got["classical@60"]  # far beyond 0.14 D the classical network fails


def _head_spread(model: nn.Module, batch: Any) -> float:
    """The largest (max - min) of any read or write weighting over a sequence: 0 = always uniform."""
    state = model.initial_state(batch.batch_size)  # type: ignore[operator]
    spread = 0.0
    for t in range(batch.steps):
        _, state = model.step(batch.inputs[:, t], state)  # type: ignore[operator]
        for w in (state.read_weights, state.write_weights):
            spread = max(spread, float((w.max(-1).values - w.min(-1).values).max()))
    return spread


@torch.no_grad()
def test_ntm_recipe_breaks_the_slot_symmetry_of_the_default_ntm() -> None:
    recipe = find_recipe("ntm", "copy")
    small = {"hidden_size": "8", "memory_slots": "16", "memory_width": "4", "max_length": "4"}
    plain = recipe.setup(recipe.with_options({**small, "random_memory": "false", "focused_start": "false"}), 0, CPU)
    batch = plain.batch(3, torch.Generator().manual_seed(0), 0)
    # the NTM's own defaults: constant memory, uniform weightings; every slot stays interchangeable
    assert bool((plain.model.memory_init == 1e-6).all())  # type: ignore[operator]
    assert _head_spread(plain.model, batch) < 1e-6
    ours = recipe.setup(recipe.with_options(small), 0, CPU)
    memory = ours.model.memory_init  # type: ignore[union-attr]
    assert float(memory.std()) > 0 and float(memory.abs().max()) <= 1 / math.sqrt(16 + 4)
    start = ours.model.initial_state(1)  # type: ignore[operator]
    assert float(start.read_weights[0, 0, 0]) > 0.99 and float(start.write_weights[0, 0, 0]) > 0.99
    assert _head_spread(ours.model, batch) > 0.1


def test_bayes_reference_matches_the_generators_own_frequencies() -> None:
    # the generator itself is the reference: among many simulated students with the same history,
    # the share answering the next exercise correctly is P(r_t = 1 | r_<t)
    gen = Synthetic5(n_train=200_000, n_test=1, n_concepts=2, n_exercises=4, seed=3)
    data = gen.generate()
    r = data.train.responses  # (S, 4)
    assert len(set(data.concept.tolist())) == 2  # both concepts occur, so the rate is shared across them
    patterns = torch.tensor([[a, b, c, 0] for a in (0, 1) for b in (0, 1) for c in (0, 1)])  # (8, 4)
    want = bayes_predictions(patterns, data.concept, data.difficulty, gen)
    for i, pattern in enumerate(patterns):
        same_past = (r[:, :3] == pattern[:3]).all(dim=1)
        for t in range(4):  # step t depends only on the first t responses
            past = (r[:, :t] == pattern[:t]).all(dim=1)
            freq = float(r[past, t].double().mean())
            assert want[i, t] == pytest.approx(freq, abs=0.01), (pattern.tolist(), t)
        assert int(same_past.sum()) > 5000  # enough students share the history for the 0.01 tolerance
