"""DNC: batched == naive per-sample reference (outputs, states, gradients), batching == looping, the
state invariants (usage, links, precedence, sparse reads), stability under extreme inputs, state
persistence, validation, and a tiny copy-task smoke test."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from memfusion.bench.naive_memories import naive_dnc_forward
from memfusion.errors import InvalidInput
from memfusion.neural.dnc import DNC, DNCConfig, DNCState
from memfusion.neural.ntm import NTM, NTMConfig
from tests.neural._copy import assert_learns_three_step_copy

SMALL = {"memory_slots": 8, "memory_width": 6, "controller_size": 12, "read_heads": 2}


def make(seed: int = 0, **kw: object) -> DNC:
    torch.manual_seed(seed)
    cfg: dict[str, object] = {"input_size": 5, "output_size": 4, **SMALL, **kw}
    return DNC(DNCConfig(**cfg))  # type: ignore[arg-type]


def inputs(b: int, t: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(b, t, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


CONFIGS = [{}, {"write_heads": 2, "read_heads": 3}, {"sparse_reads": 2}, {"read_heads": 1, "sparse_reads": 8}]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_batched_equals_naive_per_sample_reference(kw: dict[str, Any]) -> None:
    model = make(**kw).double()
    x = inputs(3, 6, dtype=torch.float64)
    weights = torch.linspace(-1, 1, 4, dtype=torch.float64)
    y, state = model(x)
    (y * weights).sum().backward()
    batched_grads = grads(model)
    model.zero_grad()
    y_naive, final = naive_dnc_forward(model, x)
    (y_naive * weights).sum().backward()
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-12)
    for name, value in final.items():
        torch.testing.assert_close(getattr(state, name), value, rtol=1e-10, atol=1e-12, msg=name)
    naive_grads = grads(model)
    assert batched_grads.keys() == naive_grads.keys() and len(batched_grads) == 8
    for name in batched_grads:
        torch.testing.assert_close(batched_grads[name], naive_grads[name], rtol=1e-8, atol=1e-10, msg=name)


def test_batch_equals_loop_over_single_samples() -> None:
    model = make(write_heads=2)
    x = inputs(4, 7)
    y, state = model(x)
    for b in range(4):
        y_b, state_b = model(x[b : b + 1])
        torch.testing.assert_close(y[b : b + 1], y_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.link[b : b + 1], state_b.link, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"write_heads": 2}, {"sparse_reads": 3}])
def test_state_invariants_hold_at_every_step(kw: dict[str, Any]) -> None:
    model = make(**kw)
    x = inputs(3, 30) * 3
    state = model.initial_state(3)
    eye = torch.eye(model.config.memory_slots, dtype=torch.bool)
    with torch.no_grad():
        for t in range(x.shape[1]):
            _, state = model.step(x[:, t], state)
            tol = 1e-5
            assert bool((state.usage >= -tol).all() and (state.usage <= 1 + tol).all())
            assert bool((state.link[..., eye] == 0).all())
            assert bool((state.link >= -tol).all() and (state.link <= 1 + tol).all())
            assert bool((state.precedence.sum(-1) <= 1 + tol).all() and (state.precedence >= -tol).all())
            assert bool((state.read_weights.sum(-1) <= 1 + tol).all() and (state.read_weights >= -tol).all())
            assert bool((state.write_weights.sum(-1) <= 1 + tol).all())
            if model.config.sparse_reads is not None:
                assert bool(((state.read_weights > 0).sum(-1) <= model.config.sparse_reads).all())


def _saturate(model: DNC) -> None:
    with torch.no_grad():
        model.interface.weight.mul_(100.0)
        bias = model.interface.bias
        bias.copy_(torch.where(torch.arange(bias.numel()) % 2 == 0, 40.0, -40.0))


@pytest.mark.parametrize("case", ["huge", "zeros", "saturated", "saturated-sparse"])
def test_no_nan_or_inf_over_200_steps_with_extreme_inputs(case: str) -> None:
    kw: dict[str, Any] = {"memory_slots": 16, "write_heads": 2}
    if case == "saturated-sparse":
        kw["sparse_reads"] = 2
    model = make(**kw)
    x = inputs(3, 200)
    if case == "huge":
        x = x * 1e6
    elif case == "zeros":
        x = torch.zeros_like(x)
    else:
        _saturate(model)
        x = x * 1e3
    y, state = model(x)
    assert torch.isfinite(y).all()
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        for t in value if isinstance(value, tuple) else (value,):
            assert torch.isfinite(t).all(), field.name
    (y.pow(2).mean() + state.memory.pow(2).mean() + state.usage.mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_state_to_dict_round_trips_through_torch_save() -> None:
    model = make(write_heads=2)
    x = inputs(2, 10)
    with torch.no_grad():
        _, mid = model(x[:, :5])
        buffer = io.BytesIO()
        torch.save(mid.to_dict(), buffer)
        buffer.seek(0)
        loaded = DNCState.from_dict(torch.load(buffer))
        y_orig, end_orig = model(x[:, 5:], mid)
        y_loaded, end_loaded = model(x[:, 5:], loaded)
    torch.testing.assert_close(y_orig, y_loaded, rtol=0, atol=0)
    torch.testing.assert_close(end_orig.link, end_loaded.link, rtol=0, atol=0)


def test_module_state_dict_round_trip() -> None:
    model = make(seed=0, sparse_reads=3)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = make(seed=99, sparse_reads=3)
    other.load_state_dict(torch.load(buffer))
    x = inputs(2, 6)
    torch.testing.assert_close(model(x)[0], other(x)[0], rtol=0, atol=0)


def test_defaults_and_initial_state() -> None:
    cfg = DNCConfig(input_size=9, output_size=8)
    assert (cfg.memory_slots, cfg.memory_width, cfg.read_heads, cfg.write_heads) == (16, 16, 4, 1)
    state = DNC(cfg).initial_state(2)
    assert state.link.shape == (2, 1, 16, 16) and state.reads.shape == (2, 4, 16)
    assert all(
        float(getattr(state, f.name).abs().sum()) == 0 for f in dataclasses.fields(state) if f.name != "controller"
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"memory_slots": 0}, "memory_slots must be an integer >= 1"),
        ({"write_heads": 0}, "write_heads must be an integer >= 1"),
        ({"sparse_reads": 0}, "sparse_reads must be None (dense reads) or an integer in [1, memory_slots=8]"),
        ({"sparse_reads": 9}, "sparse_reads must be None"),
        ({"read_heads": True}, "read_heads must be an integer"),
    ],
)
def test_bad_config_raises(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        make(**kw)
    assert message in str(info.value)


def test_bad_inputs_raise() -> None:
    model = make()
    with pytest.raises(InvalidInput, match=r"expects input of shape \(B, T, 5\)"):
        model(torch.zeros(2, 5))
    with pytest.raises(InvalidInput, match="NaN or inf"):
        model(torch.full((1, 2, 5), float("inf")))
    with pytest.raises(InvalidInput, match="needs a DNCState"):
        ntm = NTM(NTMConfig(5, 4, memory_slots=4, memory_width=3, controller_size=4))
        model.step(torch.zeros(2, 5), ntm.initial_state(2))
    with pytest.raises(InvalidInput, match=r"expects x of shape \(B, 5\)"):
        model.step(torch.zeros(2, 4), model.initial_state(2))


def test_loss_goes_down_on_three_step_copy() -> None:
    assert_learns_three_step_copy(make(controller_size=32, read_heads=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = make(write_heads=2, sparse_reads=3).double()
    x = inputs(3, 5, dtype=torch.float64)
    y_cpu, _ = model(x)
    y_gpu, state = model.cuda()(x.cuda())
    assert state.link.is_cuda
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-9, atol=1e-11)
