"""The reference model's training recipe: schedule, batches, loss, and a save / load round trip."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memfusion.errors import InvalidInput, NotFound
from memfusion.models.reference import ReferenceArch, build, load
from memfusion.models.reference_train import (
    MIXTURE,
    TrainConfig,
    answer_loss,
    lr_at,
    make_batch,
    positions_span,
    train,
)
from memfusion.models.tokenizer import build_tokenizer

TINY = ReferenceArch(layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64, max_position=4096)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(model_max_length=TINY.max_position)


def _cfg(**kw) -> TrainConfig:
    base = dict(arch=TINY, steps=10, lengths=(256,), batch_sizes=(2,), start_positions=1024, train_positions=4096)
    return TrainConfig(**{**base, **kw})


def test_config_validation() -> None:
    with pytest.raises(InvalidInput, match="same non-zero count"):
        _cfg(lengths=(256, 512), batch_sizes=(2,))
    with pytest.raises(InvalidInput, match="max\\(lengths\\) <= start_positions"):
        _cfg(start_positions=128)
    with pytest.raises(InvalidInput, match="min_lr"):
        _cfg(lr=1e-4, min_lr=1e-3)
    with pytest.raises(InvalidInput, match="divide"):
        ReferenceArch(hidden=100, heads=6)


def test_lr_schedule_hand_computed() -> None:
    cfg = _cfg(steps=110, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 110) == pytest.approx(1e-4)


def test_positions_span_follows_the_curriculum() -> None:
    cfg = _cfg(steps=100, position_ramp=0.5, contiguous=0.0)
    rng = random.Random(0)
    early = [positions_span(cfg, 0, 256, rng) for _ in range(200)]
    late = [positions_span(cfg, 80, 256, rng) for _ in range(200)]
    assert all(256 <= p <= 1024 for p in early)
    assert all(256 <= p <= 4096 for p in late) and max(late) > 1024
    assert all(positions_span(_cfg(contiguous=1.0), 5, 300, rng) == 300 for _ in range(20))


def test_batches_are_deterministic_and_label_only_the_answer(tok) -> None:
    cfg = _cfg()
    mixture = MIXTURE()
    a, b = make_batch(cfg, tok, mixture, 3), make_batch(cfg, tok, mixture, 3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.position_ids, b.position_ids)
    assert not torch.equal(a.input_ids, make_batch(cfg, tok, mixture, 4).input_ids)
    for row in range(a.input_ids.shape[0]):
        pos = a.position_ids[row]
        assert bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) < cfg.train_positions
        keep = a.labels[row] != -100
        answer = tok.decode(a.labels[row][keep])
        text = tok.decode(a.input_ids[row])
        # the labels are the tokens that follow the prompt's final "<v>": the answer, then eos
        assert answer.endswith("</s>") and text.split("<v>")[-1].startswith(answer.replace("</s>", "").rstrip())
        first = int(keep.nonzero()[0])
        assert tok.convert_ids_to_tokens(int(a.input_ids[row, first])) in ("<v>", " <v>")


def test_answer_loss_is_the_mean_of_per_example_losses(tok) -> None:
    torch.manual_seed(0)
    model = build(TINY, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    batch = make_batch(_cfg(batch_sizes=(3,)), tok, MIXTURE(), 0)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits  # (B, T, V)
    rows = [F.cross_entropy(logits[r], batch.labels[r], ignore_index=-100) for r in range(3)]
    assert answer_loss(model, batch).item() == pytest.approx(sum(r.item() for r in rows) / 3, rel=1e-5)


def test_train_save_load_round_trip(tmp_path: Path, tok) -> None:
    cfg = _cfg(steps=3, warmup=1, eval_every=3, eval_lengths=(300,), eval_samples=1, threads=1)
    record = train(cfg, tmp_path / "w")
    assert record["evaluations"][-1]["step"] == 3 and "niah_single@300" in record["evaluations"][-1]
    model, tokenizer = load(tmp_path / "w")
    assert model.config.num_hidden_layers == 4 and model.config.num_key_value_heads == 2
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == TINY.max_position
    again = train(cfg, tmp_path / "w2")  # reproducible from the seed
    twin, _ = load(tmp_path / "w2")
    for (n1, p1), (_, p2) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1
    assert json.loads((tmp_path / "w" / "training.json").read_text())["config"]["steps"] == 3
    assert again["evaluations"][-1]["niah_single@300"] == record["evaluations"][-1]["niah_single@300"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"model\.safetensors missing"):
        load(tmp_path)
