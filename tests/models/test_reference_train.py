"""The reference model's training recipe: schedule, batches, loss, and a save / load round trip."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memfusion.bench.tasks.training import random_position_ids
from memfusion.errors import InvalidInput, NotFound
from memfusion.models.reference import ReferenceArch, arch_dict, build, load, spread_digit_places
from memfusion.models.reference_train import (
    MIXTURE,
    MIXTURES,
    Stage,
    TrainConfig,
    answer_loss,
    lr_at,
    make_batch,
    train,
)
from memfusion.models.tokenizer import DIGIT_PLACES, DIGITS, build_tokenizer, digit_tag, vocabulary

UNTAG = {digit_tag(p, d): d for p in range(DIGIT_PLACES) for d in DIGITS}


def untag(tag: str) -> str:
    return UNTAG[tag]

TINY = ReferenceArch(layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64, max_position=4096, head_dim=None)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(model_max_length=TINY.max_position)


def _cfg(steps: int = 10, **kw) -> TrainConfig:
    return TrainConfig(**{"arch": TINY, "stages": (Stage(256, 4, steps),), **kw})


def test_config_validation() -> None:
    with pytest.raises(InvalidInput, match="at least one stage"):
        _cfg(stages=())
    with pytest.raises(InvalidInput, match="length >= 64"):
        _cfg(stages=(Stage(32, 4, 10),))
    with pytest.raises(InvalidInput, match="longer than the model's max_position"):
        _cfg(stages=(Stage(8192, 1, 10),))
    with pytest.raises(InvalidInput, match="min_lr"):
        _cfg(lr=1e-4, min_lr=1e-3)
    with pytest.raises(InvalidInput, match="divide"):
        ReferenceArch(hidden=100, heads=6, head_dim=None)
    with pytest.raises(InvalidInput, match="positive"):
        ReferenceArch(head_dim=0)


def test_wider_heads_than_hidden_over_heads(tok) -> None:  # type: ignore[no-untyped-def]
    wide = replace(TINY, head_dim=16)  # hidden 32 / 4 heads would be 8
    model = build(wide, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 16, 32) and attn.k_proj.weight.shape == (2 * 16, 32)
    assert attn.o_proj.weight.shape == (32, 4 * 16)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert model(input_ids=ids).logits.shape == (1, 4, len(tok))
    default = build(TINY, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert default.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    # the record names head_dim only when it is set, so earlier records (without it) still match
    assert "head_dim" not in arch_dict(TINY) and arch_dict(wide)["head_dim"] == 16
    assert ReferenceArch(hidden=100, heads=6, kv_heads=3, head_dim=16).head_dim == 16


def test_lr_schedule_restarts_at_every_stage_hand_computed() -> None:
    cfg = _cfg(stages=(Stage(128, 2, 110), Stage(256, 1, 50)), warmup=10, stage_warmup=5, lr=1e-3, min_lr=1e-4)
    assert cfg.steps == 160 and cfg.stage_at(109) == (0, 109) and cfg.stage_at(110) == (1, 0)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 110) == pytest.approx(2e-4)  # the second stage warms up again: 1/5 of lr
    assert lr_at(cfg, 114) == pytest.approx(1e-3)
    assert lr_at(cfg, 137) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 22 / 45)))
    with pytest.raises(InvalidInput, match="past the last stage"):
        lr_at(cfg, 160)


def test_scaled_keeps_the_proportions_and_the_total() -> None:
    sizes = ((128, 32, 1000), (256, 16, 400), (512, 8, 400), (1024, 4, 500), (2048, 2, 500), (4096, 1, 400))
    cfg = _cfg(stages=tuple(Stage(*size) for size in sizes))
    small = cfg.scaled(33)
    assert small.steps == 33 and [s.length for s in small.stages] == [s.length for s in cfg.stages]
    assert [s.steps for s in small.stages] == [10, 4, 4, 5, 5, 5]
    with pytest.raises(InvalidInput, match="number of stages"):
        cfg.scaled(3)


def test_batches_follow_the_stages(tok) -> None:
    cfg = _cfg(stages=(Stage(128, 3, 2, "warm"), Stage(256, 2, 2)))
    batches = [make_batch(cfg, tok, MIXTURE(), step) for step in range(4)]
    assert [b.input_ids.shape[0] for b in batches] == [3, 3, 2, 2]
    for b, length in zip(batches, (128, 128, 256, 256), strict=True):
        prompts = (b.labels != -100).int().argmax(dim=1) + 1  # (B,): tokens before the first answer
        assert all(0.95 * length <= int(n) <= 1.05 * length for n in prompts), (length, prompts)


def test_batches_are_deterministic_and_label_only_the_answer(tok) -> None:
    cfg = _cfg()
    mixture = MIXTURE()
    a, b = make_batch(cfg, tok, mixture, 3), make_batch(cfg, tok, mixture, 3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.position_ids, b.position_ids)
    assert not torch.equal(a.input_ids, make_batch(cfg, tok, mixture, 4).input_ids)
    extra = 0
    for row in range(a.input_ids.shape[0]):
        pos = a.position_ids[row]
        assert torch.equal(pos, torch.arange(len(pos)))
        keep = (a.labels[row] != -100).tolist()
        spans = [t for t in range(len(keep)) if keep[t] and (t == 0 or not keep[t - 1])]
        assert spans, "every row has a supervised answer"
        context = tok.decode(a.input_ids[row, : spans[0]])
        for n, start in enumerate(spans):
            end = start
            while end < len(keep) and keep[end]:
                end += 1
            # labels at t are the input token at t + 1: the answer follows a "<v>" and ends with eos
            assert tok.convert_ids_to_tokens(int(a.input_ids[row, start])) in ("<v>", " <v>")
            assert torch.equal(a.labels[row, start:end], a.input_ids[row, start + 1 : end + 1])
            answer = tok.decode(a.labels[row, start:end])
            assert answer.endswith("</s>")
            if n:  # an extra question: its key's value in the context is the supervised answer
                extra += 1
                question = tok.decode(a.input_ids[row, spans[n - 1] : start + 1]).split("</s>", 1)[1]
                key = re.search(r"(?:value of|number for) ([a-z]+ [a-z]+)", question)
                assert key is not None
                value = answer.removesuffix("</s>").strip()
                assert re.search(re.escape(key.group(1)) + r" (?:is )?<v> " + value + r"\b", context), (key, value)
    assert extra > 0, "the mixture's fact and needle tasks ask extra questions"


def test_answer_loss_is_the_mean_of_per_example_losses(tok) -> None:
    torch.manual_seed(0)
    model = build(TINY, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    batch = make_batch(_cfg(stages=(Stage(256, 3, 10),)), tok, MIXTURE(), 0)
    ones = torch.ones_like(batch.input_ids)
    logits = model(input_ids=batch.input_ids, attention_mask=ones, position_ids=batch.position_ids).logits
    rows = [F.cross_entropy(logits[r], batch.labels[r], ignore_index=-100) for r in range(3)]  # logits: (B, T, V)
    assert answer_loss(model, batch).item() == pytest.approx(sum(r.item() for r in rows) / 3, rel=1e-5)


def test_a_stage_with_positions_draws_sorted_distinct_positions_within_its_span(tok) -> None:
    cfg = _cfg(stages=(Stage(128, 4, 2, "warm"), Stage(128, 4, 2, "warm", positions=2048)))
    plain, spread = make_batch(cfg, tok, MIXTURES["warm"](), 1), make_batch(cfg, tok, MIXTURES["warm"](), 2)
    width = plain.input_ids.shape[1]
    assert torch.equal(plain.position_ids, torch.arange(width).expand(4, width))
    pos = spread.position_ids  # (B, T)
    assert pos.shape == spread.input_ids.shape and int(pos.min()) >= 0 and int(pos.max()) < 2048
    assert bool((pos.diff(dim=1) > 0).all())  # strictly increasing: sorted and distinct
    assert int(pos[:, -1].max()) > 4 * width  # spread over the span, not packed at its start
    assert torch.equal(pos, make_batch(cfg, tok, MIXTURES["warm"](), 2).position_ids)  # from the seed
    with pytest.raises(InvalidInput, match="positions"):
        _cfg(stages=(Stage(256, 4, 2, positions=128),))  # narrower than the length
    with pytest.raises(InvalidInput, match="max_position"):
        _cfg(stages=(Stage(256, 4, 2, positions=10**6),))


def test_a_stage_with_min_length_mixes_example_lengths(tok) -> None:
    cfg = _cfg(stages=(Stage(256, 8, 2, "warm"), Stage(256, 8, 2, "warm", min_length=64)), extra_questions=0)
    batches = [make_batch(cfg, tok, MIXTURES["warm"](), step) for step in (0, 2)]
    real = [(b.input_ids != tok.pad_token_id).sum(dim=1) for b in batches]  # (B,) tokens per row
    answer = len(tok(" 12345", add_special_tokens=False)["input_ids"]) + 1  # the value and </s>
    assert len(set(real[0].tolist())) == 1 and int(real[0][0]) - answer == 256  # every example at length
    sizes = real[1] - answer  # (B,): the prompt lengths drawn from [64, 256]
    assert int(sizes.min()) >= 64 and int(sizes.max()) <= 256 and len(set(sizes.tolist())) >= 4
    with pytest.raises(InvalidInput, match="min_length"):
        _cfg(stages=(Stage(256, 4, 2, min_length=32),))


def test_answers_see_the_whole_context_under_randomised_positions(tok) -> None:
    """The loss of every row depends on its first tokens although position ids jump (without a
    mask or a cache, transformers reads the gaps as boundaries of packed sequences)."""
    torch.manual_seed(0)
    model = build(TINY, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    batch = make_batch(_cfg(stages=(Stage(256, 3, 10),)), tok, MIXTURE(), 5)
    gen = torch.Generator().manual_seed(0)
    batch = replace(batch, position_ids=random_position_ids(3, batch.input_ids.shape[1], 4096, gen))
    assert (batch.position_ids.diff(dim=1) > 1).any(dim=1).all()  # gaps in every row
    embed = model.get_input_embeddings()
    seen: list[torch.Tensor] = []
    hook = embed.register_forward_hook(lambda _m, _i, out: seen.append(out) or out.retain_grad())
    answer_loss(model, batch).backward()
    hook.remove()
    grad = seen[0].grad  # (B, T, H)
    assert grad is not None and (grad[:, 1:4].abs().sum(dim=(1, 2)) > 0).all()


def test_train_save_load_round_trip(tmp_path: Path, tok) -> None:
    cfg = _cfg(steps=3, warmup=1, eval_every=3, eval_lengths=(300,), eval_samples=1, threads=1)
    cfg = replace(cfg, stages=(Stage(128, 2, 1, "warm"), Stage(256, 2, 2)))
    record = train(cfg, tmp_path / "w")
    assert record["evaluations"][-1]["step"] == 3 and "niah_single@300" in record["evaluations"][-1]
    model, tokenizer = load(tmp_path / "w")
    assert model.config.num_hidden_layers == 4 and model.config.num_key_value_heads == 2
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == TINY.max_position
    again = train(cfg, tmp_path / "w2")  # reproducible from the seed
    twin, _ = load(tmp_path / "w2")
    for (n1, p1), (_, p2) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1
    saved = json.loads((tmp_path / "w" / "training.json").read_text())
    assert saved["stages_done"] == 2 and [e["stage"] for e in saved["evaluations"]] == [0, 1]
    assert again["evaluations"][-1]["niah_single@300"] == record["evaluations"][-1]["niah_single@300"]


def test_a_stage_with_until_ends_once_its_loss_is_reached(tmp_path: Path, tok) -> None:
    """A loss bound every step meets ends the stage after min_stage_steps; one no step meets
    (a loss never below 1e-9 here) runs the stage to its cap."""
    cfg = _cfg(steps=3, warmup=1, eval_every=100, eval_lengths=(300,), eval_samples=1, threads=1, min_stage_steps=2)
    cfg = replace(cfg, stages=(Stage(128, 2, 6, "warm", until=1e6), Stage(128, 2, 3, "warm", until=1e-9)))
    record = train(cfg, tmp_path / "w")
    assert record["stage_steps"] == [2, 3] and record["steps"] == 5
    assert [(e["stage"], e["stage_step"], e["step"]) for e in record["evaluations"]] == [(0, 2, 2), (1, 3, 5)]
    saved = json.loads((tmp_path / "w" / "training.json").read_text())
    assert saved["stage_steps"] == [2, 3] and saved["stages_done"] == 2
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match="until"):
            replace(cfg, stages=(Stage(128, 2, 6, until=bad),))
    with pytest.raises(InvalidInput, match="min_stage_steps"):
        replace(cfg, min_stage_steps=0)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path, tok) -> None:
    cfg = _cfg(steps=3, warmup=1, eval_every=100, eval_lengths=(300,), eval_samples=1, threads=1)
    first = Stage(128, 2, 2, "warm", plain_digits=True)  # bare digits, spread at the second stage
    whole = replace(cfg, stages=(first, Stage(128, 2, 2, "noise"), Stage(256, 1, 2)))
    train(whole, tmp_path / "one")
    train(replace(whole, stages=whole.stages[:1]), tmp_path / "two")  # stopped before the spread
    assert len(load(tmp_path / "two")[1]) == len(vocabulary(1))
    train(replace(whole, stages=whole.stages[:2]), tmp_path / "two", resume=True)  # and after it
    record = train(whole, tmp_path / "two", resume=True)
    assert record["stages_done"] == 3 and record["steps"] == 6 and record["stage_steps"] == [2, 2, 2]
    assert [e["stage"] for e in record["evaluations"]] == [0, 1, 2]
    one, _ = load(tmp_path / "one")
    two, _ = load(tmp_path / "two")
    for (name, p1), (_, p2) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), name
    with pytest.raises(InvalidInput, match="lr differ"):
        train(replace(whole, lr=1e-3), tmp_path / "two", resume=True)
    with pytest.raises(InvalidInput, match="the stages differ"):
        train(replace(whole, stages=(replace(first, steps=3), *whole.stages[1:])), tmp_path / "two", resume=True)
    (tmp_path / "two" / "optimizer.pt").unlink()
    with pytest.raises(InvalidInput, match="no resumable checkpoint"):
        train(whole, tmp_path / "two", resume=True)


def test_spreading_digit_places_keeps_what_the_model_computes(tok) -> None:  # type: ignore[no-untyped-def]
    """After the spread, the model reads a text in place tags exactly as it read it in bare digits,
    and gives every place tag its bare digit's logit."""
    bare_tok = build_tokenizer(TINY.max_position, digit_places=1)
    torch.manual_seed(0)
    model = build(TINY, len(bare_tok), 0, 1, 2).eval()
    text = "one of the special magic numbers for amber falcon is <v> 4821735. 90 <v> 1"
    bare_ids = bare_tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(bare_ids).logits[0]  # (T, 1284)
        spread_digit_places(model)
        ids = tok(text, return_tensors="pt").input_ids
        after = model(ids).logits[0]  # (T, 1464)
    assert ids.shape == bare_ids.shape and not torch.equal(ids, bare_ids)
    assert after.shape[1] == len(tok) == len(vocabulary())
    torch.testing.assert_close(after[:, : len(bare_tok)], before)
    for token in vocabulary()[len(bare_tok) :]:  # " <tag of place p, digit d>" reads as " <bare d>"
        bare_id = bare_tok.get_vocab()[token.replace(token.strip(), digit_tag(0, untag(token.strip())))]
        torch.testing.assert_close(after[:, tok.get_vocab()[token]], before[:, bare_id])
    with pytest.raises(InvalidInput, match="bare-digit vocabulary"):
        spread_digit_places(model)  # already spread


def test_plain_digit_stages_come_first() -> None:
    with pytest.raises(InvalidInput, match="plain_digits"):
        TrainConfig(arch=TINY, stages=(Stage(128, 2, 1), Stage(128, 2, 1, plain_digits=True)))


def test_training_goes_on_from_a_checkpoint(tmp_path: Path, tok) -> None:
    cfg = _cfg(steps=1, eval_lengths=(300,), eval_samples=1, threads=1)
    train(cfg, tmp_path / "a")
    start, _ = load(tmp_path / "a")
    record = train(replace(cfg, lr=1e-6, min_lr=1e-6, seed=5), tmp_path / "b", init=tmp_path / "a")
    after, _ = load(tmp_path / "b")
    assert record["init"] == str(tmp_path / "a")
    for (name, p0), (_, p1) in zip(start.state_dict().items(), after.state_dict().items(), strict=True):
        assert torch.allclose(p0, p1, atol=1e-4), name  # one tiny step away, not a fresh init


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"model\.safetensors missing"):
        load(tmp_path)
